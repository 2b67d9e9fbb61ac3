"""`xiaolm recipe`: the seed projects as runnable recipes, from the public downloads to a chat model.

A recipe (src/xiaolm/recipes/NAME.yaml) names its sources (public datasets by their `xiaolm data import` recipe,
grouped by use) and its training stages (a TrainConfig per stage, plus what changes at fixture scale). `run`
executes, in order: import → clean → dedup → tokenizer → pack → each training stage (pretrain, sft, pairs, dpo,
reward, ppo, finetune) → eval → export, one progress line per stage. A finished stage is skipped (its
`recipe_done.json`); an interrupted training stage resumes from its last checkpoint.

`--scale full` reads the downloads under `--downloads DIR` at the paths the recipe names; `--scale fixture` writes
the demo corpus in each source's own layout (data/demo/layouts.py) and runs every stage on it with a tiny model,
in minutes on a CPU: the same code path as the real run.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from xiaolm.config import load_config, merge_tree
from xiaolm.errors import XiaolmError
from xiaolm.io import atomic_write_json

log = logging.getLogger(__name__)

RECIPES = resources.files("xiaolm") / "recipes"
DONE = "recipe_done.json"
KINDS = ("pretrain", "sft", "pairs", "dpo", "reward", "ppo", "finetune")


@dataclass
class Stage:
    """One training stage of a recipe."""

    name: str = ""
    kind: str = ""  # pretrain | sft | pairs | dpo | reward | ppo | finetune
    start: str = ""  # the stage whose model this one starts from (pretrain: none)
    data: str = ""  # a source group, or (dpo, reward) a pairs stage's name
    chat: str = ""  # finetune: the source group of the chats mixed in
    reward_model: str = ""  # ppo: the reward stage
    config: dict[str, Any] = field(default_factory=dict)  # TrainConfig keys
    fixture: dict[str, Any] = field(default_factory=dict)  # what changes at --scale fixture


@dataclass
class Eval:
    """One `xiaolm eval` task of the recipe's last model on a source group."""

    task: str = ""
    model: str = ""  # the stage whose model is evaluated
    data: str = ""  # a source group (its imported records)
    path: str = ""  # --scale full: a file under --downloads read as published instead (e.g. a held-out test set)
    limit: int = 200
    fixture_limit: int = 12
    max_new_tokens: int = 256  # generation tasks (bleu, rouge, exact): the answer budget
    fixture_max_new_tokens: int = 24


@dataclass
class Recipe:
    """A seed project as stages; see docs/recipes/NAME.md for its guide."""

    about: str = ""
    guide: str = ""
    seed: int = 0
    vocab_size: int = 8192
    fixture_vocab_size: int = 600
    cjk_chars: bool = False  # tokenizer: every CJK character its own token first
    sources: dict[str, dict[str, str]] = field(default_factory=dict)  # group → import recipe → download path
    pretrain_text: list[str] = field(default_factory=list)  # source groups cleaned, deduplicated, packed
    clean_chats: list[str] = field(default_factory=list)  # chat groups cleaned and deduplicated before training
    chat_clean: dict[str, Any] = field(default_factory=dict)  # their CleanConfig keys (e.g. max_prompt_chars)
    fixture_records: int = 400  # demo records written per source at fixture scale
    stages: list[Stage] = field(default_factory=list)
    evals: list[Eval] = field(default_factory=list)
    export: str = ""  # the stage whose model becomes OUT/model
    merge_lora: bool = False


def recipe_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in RECIPES.iterdir() if p.name.endswith(".yaml"))


def load_recipe(name: str) -> Recipe:
    """A shipped recipe by name, or a recipe YAML file by path."""
    path = Path(name) if name.endswith(".yaml") else Path(str(RECIPES / f"{name}.yaml"))
    if not path.is_file():
        raise XiaolmError(f"no recipe {name!r}", hint=f"use one of {', '.join(recipe_names())} or a recipe .yaml")
    recipe = load_config(Recipe, path)
    names = [s.name for s in recipe.stages]
    for stage in recipe.stages:
        if stage.kind not in KINDS:
            raise XiaolmError(f"stage {stage.name!r} has kind {stage.kind!r}", where=str(path),
                              hint=f"use one of {', '.join(KINDS)}")
        for ref in (stage.start, stage.reward_model):
            if ref and ref not in names[:names.index(stage.name)]:
                raise XiaolmError(f"stage {stage.name!r} names {ref!r}, which is not an earlier stage", where=str(path))
    return recipe


def _done(path: Path) -> dict | None:
    return json.loads((path / DONE).read_text(encoding="utf-8")) if (path / DONE).is_file() else None


def _step(path: Path, label: str, fn: Any) -> Any:
    """Run fn() unless path holds a finished stage; mark it finished with what fn returned (and the seconds)."""
    done = _done(path)
    if done is not None:
        log.info("recipe: %s already finished; skipping", label)
        return done
    start = time.perf_counter()
    result = fn()
    summary = {"result": result if isinstance(result, dict) else str(result), "seconds": time.perf_counter() - start}
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path / DONE, summary)
    return summary


class Runner:
    """The state of one `xiaolm recipe run`: where things are, what has been built."""

    def __init__(self, recipe: Recipe, name: str, out: Path, scale: str, downloads: Path | None):
        if scale not in ("fixture", "full"):
            raise XiaolmError(f"--scale {scale!r}", hint="use fixture or full")
        if scale == "full" and downloads is None:
            raise XiaolmError("--scale full reads the downloads", where="--downloads",
                              hint=f"download the sources listed in {recipe.guide} and pass their folder")
        self.recipe, self.name, self.out, self.scale, self.downloads = recipe, name, out, scale, downloads
        # source group → the record dirs its imports write (known before they exist: later stages of a resumed run)
        self.groups = {g: [str(out / "import" / src) for src in files] for g, files in recipe.sources.items()}
        self.imported = dict(self.groups)
        unknown = [g for g in recipe.clean_chats if g not in self.groups]
        if unknown:
            raise XiaolmError(f"clean_chats names {unknown}, which are not source groups", where=f"recipe {name}")
        for group in recipe.clean_chats:  # later stages read the cleaned, deduplicated chats
            self.groups[group] = [str(out / f"clean-{group}" / "dedup")]
        self.plan = self._plan()

    def _plan(self) -> list[tuple[str, Any]]:
        r = self.recipe
        plan: list[tuple[str, Any]] = [("import", self.import_sources)]
        plan += [(f"clean-{g}", lambda g=g: self.clean_chat_group(g)) for g in r.clean_chats]
        if r.pretrain_text:
            plan += [("clean", self.clean), ("dedup", self.dedup)]
        plan += [("tokenizer", self.tokenizer)]
        if r.pretrain_text:
            plan += [("pack", self.pack)]
        plan += [(s.name, lambda s=s: self.train(s)) for s in r.stages]
        plan += [(f"eval-{e.task}", lambda e=e: self.evaluate(e)) for e in r.evals]
        if r.export:
            plan += [("export", self.export)]
        return plan

    def run(self, only: str = "") -> dict[str, Any]:
        names = [n for n, _ in self.plan]
        if only and only not in names:
            raise XiaolmError(f"no stage {only!r} in recipe {self.name}", where="--stage",
                              hint=f"stages in order: {', '.join(names)}")
        self.out.mkdir(parents=True, exist_ok=True)
        results = {}
        for i, (name, fn) in enumerate(self.plan, 1):
            if only and name != only and _done(self.out / name) is None and names.index(name) < names.index(only):
                raise XiaolmError(f"--stage {only} needs {name} first", hint="run the recipe without --stage")
            if only and name != only:
                continue
            log.info("recipe %s [%d/%d] %s", self.name, i, len(self.plan), name)
            results[name] = _step(self.out / name, name, fn)
        atomic_write_json(self.out / "recipe.json", {"recipe": self.name, "scale": self.scale,
                                                      "stages": names, "results": results})
        return results

    # --- data stages -------------------------------------------------------------------------------------------

    def import_sources(self) -> dict:
        from xiaolm.data.sources import import_records

        reports = {}
        inputs = self._fixtures() if self.scale == "fixture" else {
            src: [str(self.downloads / path)] for files in self.recipe.sources.values() for src, path in files.items()}
        for src, paths in inputs.items():
            missing = [p for p in paths if not Path(p).exists()]
            if missing:
                raise XiaolmError(f"source {src}: {missing[0]} is missing", where="--downloads",
                                  hint=f"download it as {self.recipe.guide} says")
            reports[src] = import_records(src, paths, self.out / "import" / src)["records_written"]
        return reports

    def _fixtures(self) -> dict[str, list[str]]:
        """The demo corpus in each source's layout, written once under OUT/fixtures."""
        from xiaolm.data.demo.corpus import build_demo_corpus
        from xiaolm.data.demo.layouts import LAYOUTS, demo_records, write_layout

        corpus = build_demo_corpus(self.out / "fixtures" / "demo", seed=self.recipe.seed, scale=0.1)
        records = demo_records(corpus)
        n = self.recipe.fixture_records
        out: dict[str, list[str]] = {}
        for k, src in enumerate(sorted({s for files in self.recipe.sources.values() for s in files})):
            kind = LAYOUTS[src][1]
            chunk = records[kind][k * n % max(1, len(records[kind])):][:n] or records[kind][:n]  # sources differ
            out[src] = [str(write_layout(src, chunk, self.out / "fixtures" / src))]
        return out

    def clean_chat_group(self, group: str) -> dict:
        """Clean (the recipe's chat_clean settings) and deduplicate one group's imported chats."""
        from xiaolm.data.clean import CleanConfig, clean_files
        from xiaolm.data.dedup import dedup_files

        out = self.out / f"clean-{group}"
        settings = load_config(CleanConfig, base=self.recipe.chat_clean)
        cleaned = clean_files(self.imported[group], out / "clean", settings)
        deduped = dedup_files([out / "clean"], out / "dedup")
        return {"clean": {k: cleaned[k] for k in ("records_in", "records_out", "rejected")},
                "dedup": {k: deduped[k] for k in ("records_in", "records_out", "removed")}}

    def _text_dirs(self) -> list[str]:
        return [d for g in self.recipe.pretrain_text for d in self.imported[g]]

    def clean(self) -> dict:
        from xiaolm.data.clean import clean_files

        return clean_files(self._text_dirs(), self.out / "clean")

    def dedup(self) -> dict:
        from xiaolm.data.dedup import dedup_files

        return dedup_files([self.out / "clean"], self.out / "dedup")

    def tokenizer(self) -> str:
        from xiaolm.tokenizer import train_tokenizer

        text = [str(self.out / "dedup")] if self.recipe.pretrain_text else [d for g in self.groups.values() for d in g]
        vocab = self.recipe.fixture_vocab_size if self.scale == "fixture" else self.recipe.vocab_size
        return str(train_tokenizer(text, self.out / "tokenizer", vocab_size=vocab, cjk_chars=self.recipe.cjk_chars,
                                   min_frequency=1 if self.scale == "fixture" else 2))

    def pack(self) -> dict:
        from xiaolm.data.pack import pack_files

        return pack_files([self.out / "dedup"], self.out / "tokenizer", self.out / "pack",
                          val_fraction=0.05 if self.scale == "fixture" else 0.005, seed=self.recipe.seed)

    # --- training stages ---------------------------------------------------------------------------------------

    def _files(self, group: str) -> str:
        if group not in self.groups:
            raise XiaolmError(f"no source group {group!r}", where=f"recipe {self.name}",
                              hint=f"groups: {', '.join(self.groups)}")
        return ",".join(self.groups[group])

    def settings(self, stage: Stage) -> dict[str, Any]:
        """The stage's own keys, with the fixture changes merged in at fixture scale."""
        return merge_tree(stage.config, stage.fixture) if self.scale == "fixture" else dict(stage.config)

    def stage_config(self, stage: Stage) -> Any:
        """The stage's TrainConfig: the recipe's keys, the fixture changes, and the joins the runner makes."""
        from xiaolm.train.config import TrainConfig

        tree = self.settings(stage)
        data = dict(tree.get("data", {}))
        joins: dict[str, Any] = {"out": str(self.out / stage.name), "seed": self.recipe.seed}
        if stage.start:
            joins["init_from"] = str(self.out / stage.start)
        if stage.kind == "pretrain":
            data.update(path=str(self.out / "pack"), tokenizer=str(self.out / "tokenizer"))
        elif stage.data in self.groups:
            data["path"] = self._files(stage.data)
        elif stage.data:  # a pairs stage's output
            data["path"] = str(self.out / stage.data / "pairs.jsonl")
        if stage.kind == "sft" and not stage.start:
            data["tokenizer"] = str(self.out / "tokenizer")  # text-to-text pretraining on pairs: a fresh model
        if stage.chat:
            data["chat_path"] = self._files(stage.chat)
        if stage.reward_model:
            joins["rl"] = {**tree.get("rl", {}), "reward_model": str(self.out / stage.reward_model / "best")}
        return load_config(TrainConfig, base=merge_tree(merge_tree(tree, {"data": data}), joins))

    def train(self, stage: Stage) -> dict:
        if stage.kind == "pairs":
            return self._pairs(stage)
        from xiaolm.train import dpo, finetune, ppo, pretrain, reward, sft

        run = {"pretrain": pretrain.run_pretrain, "sft": sft.run_sft, "dpo": dpo.run_dpo,
               "reward": reward.run_reward, "ppo": ppo.run_ppo, "finetune": finetune.run_finetune}[stage.kind]
        return run(self.stage_config(stage), resume=True)

    def _pairs(self, stage: Stage) -> dict:
        from xiaolm.infer.generate import GenerationConfig
        from xiaolm.infer.pairs import build_pairs

        tree = self.settings(stage)
        gen = GenerationConfig(max_new_tokens=int(tree.get("max_new_tokens", 128)),
                               temperature=float(tree.get("temperature", 0.9)), top_p=float(tree.get("top_p", 0.95)),
                               seed=self.recipe.seed)
        return build_pairs(str(self.out / stage.start), self.groups[stage.data], self.out / stage.name, gen,
                           limit=int(tree.get("limit", 0)))

    # --- evaluation and export ---------------------------------------------------------------------------------

    def evaluate(self, e: Eval) -> dict:
        from xiaolm.eval.tasks import evaluate

        fixture = self.scale == "fixture"
        data = [str(self.downloads / e.path)] if e.path and not fixture else self.groups[e.data]
        result, _ = evaluate(str(self.out / e.model), e.task, data,
                             limit=e.fixture_limit if fixture else e.limit,
                             max_new_tokens=e.fixture_max_new_tokens if fixture else e.max_new_tokens)
        return result

    def export(self) -> str:
        from xiaolm.model.export import export_hf

        return str(export_hf(self.out / self.recipe.export, self.out / "model", merge=self.recipe.merge_lora))


def run_recipe(name: str, scale: str = "fixture", out: str | Path | None = None, stage: str = "",
               downloads: str | Path | None = None) -> dict[str, Any]:
    """`xiaolm recipe run`: every stage of the recipe (or only `stage`) under out (default runs/NAME-SCALE)."""
    recipe = load_recipe(name)
    label = Path(name).stem if name.endswith(".yaml") else name
    out = Path(out or f"runs/{label}-{scale}")
    runner = Runner(recipe, label, out, scale, Path(downloads) if downloads else None)
    results = runner.run(stage)
    log.info("recipe %s: done under %s%s", label, out, f"; chat: xiaolm chat {out / 'model'}" if recipe.export else "")
    return results


def list_arguments(p: Any) -> None:
    """`xiaolm recipe list` takes no arguments."""


def cmd_list(args: Any) -> None:
    """`xiaolm recipe list`: each recipe with its one line."""
    for name in recipe_names():
        recipe = load_recipe(name)
        print(f"{name:<20} {recipe.about}\n{'':<20} guide: {recipe.guide}")


def run_arguments(p: Any) -> None:
    p.add_argument("name", metavar="NAME", help="a recipe of `xiaolm recipe list`, or a recipe .yaml file")
    p.add_argument("--scale", choices=("fixture", "full"), default="fixture",
                   help="fixture: the demo corpus in each source's layout, a tiny model, CPU minutes (default); "
                        "full: the real downloads and the seed's model")
    p.add_argument("--downloads", metavar="DIR", help="--scale full: the folder holding the downloaded sources")
    p.add_argument("--stage", default="", help="run only this stage (the earlier ones must have finished)")
    p.add_argument("--out", default=None, help="output folder (default runs/NAME-SCALE)")


def cmd_run(args: Any) -> None:
    """`xiaolm recipe run`."""
    run_recipe(args.name, args.scale, args.out, args.stage, args.downloads)
