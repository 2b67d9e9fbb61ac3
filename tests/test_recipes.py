"""The four seed recipes at fixture scale: every stage runs on the demo corpus written in each source's own
layout, the finished run is skipped stage by stage, an interrupted training stage resumes, and the exported model
loads in transformers."""

import json

import pytest

from xiaolm.errors import XiaolmError
from xiaolm.recipe import load_recipe, recipe_names, run_recipe

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]


def test_the_four_seed_recipes_are_shipped():
    assert set(recipe_names()) == {"chatlm-t5-0.2b", "mini-chatgpt-0.1b", "baby-llama2", "zero-chatgpt-0.1b"}


@pytest.mark.parametrize("name", ["chatlm-t5-0.2b", "mini-chatgpt-0.1b", "baby-llama2", "zero-chatgpt-0.1b"])
def test_recipe_runs_every_stage_at_fixture_scale(name, tmp_path, caplog):
    import transformers

    out = tmp_path / name
    results = run_recipe(name, "fixture", out)
    recipe = load_recipe(name)
    text = recipe.pretrain_text
    plan = ["import", *(f"clean-{g}" for g in recipe.clean_chats), *(["clean", "dedup"] if text else []), "tokenizer",
            *(["pack"] if text else []), *(s.name for s in recipe.stages),
            *(f"eval-{e.task}" for e in recipe.evals), "export"]
    assert list(results) == plan
    for stage in recipe.stages:  # each training stage ran to its last step
        if stage.kind != "pairs":
            done = json.loads((out / stage.name / "done.json").read_text())
            assert done["steps"] == recipe.stages[[s.name for s in recipe.stages].index(stage.name)].fixture.get(
                "max_steps", done["steps"])
    for e in recipe.evals:
        result = results[f"eval-{e.task}"]["result"]
        assert result.get("n", result.get("tokens")) > 0
    arch = json.loads((out / "model" / "config.json").read_text())["architectures"][0]
    auto = transformers.AutoModelForSeq2SeqLM if arch.startswith("T5") else transformers.AutoModelForCausalLM
    auto.from_pretrained(out / "model")
    transformers.AutoTokenizer.from_pretrained(out / "model")
    if not arch.startswith("T5"):  # the tokenizer's CJK-first split is one llama.cpp reproduces
        from xiaolm.model.gguf import export_gguf

        assert export_gguf(out / "model", tmp_path / "model.gguf").stat().st_size > 0

    # a rerun skips every finished stage; a training stage stopped after its checkpoint resumes there
    last = [s for s in recipe.stages if s.kind != "pairs"][-1].name
    for stage in (last, "export"):
        (out / stage / "recipe_done.json").unlink()
    first_steps = (out / last / "log.jsonl").read_text().count('"step": 1,')
    caplog.clear()
    with caplog.at_level("INFO"):
        run_recipe(name, "fixture", out)
    skipped = [r.getMessage() for r in caplog.records if "already finished; skipping" in r.getMessage()]
    assert len(skipped) == len(plan) - 2
    assert (out / last / "log.jsonl").read_text().count('"step": 1,') == first_steps  # resumed, not restarted
    assert (out / "model" / "config.json").is_file()


def test_a_stage_of_another_recipe_or_before_its_inputs_is_refused(tmp_path):
    with pytest.raises(XiaolmError, match="no stage 'nope'"):
        run_recipe("baby-llama2", "fixture", tmp_path, stage="nope")
    with pytest.raises(XiaolmError, match="needs import first"):
        run_recipe("baby-llama2", "fixture", tmp_path, stage="sft")
    with pytest.raises(XiaolmError, match="--downloads"):
        run_recipe("baby-llama2", "full", tmp_path)
    with pytest.raises(XiaolmError, match="no recipe"):
        run_recipe("gpt-5", "fixture", tmp_path)
