"""The objective interface carries methods the product does not have yet, written here: one trains an extra head
and is judged by accuracy (higher is better), one generates inside the per-step hook. Both go through the real
loop, and a run killed with SIGKILL resumes to the same per-step metrics and the same final weights."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tests.test_train_loop import final_weights, make_packed, tiny_cfg
from xiaolm.infer.generate import GenerationConfig, generate_batch
from xiaolm.train.loop import train
from xiaolm.train.objective import Objective
from xiaolm.train.pretrain import PretrainObjective
from xiaolm.train.stage import build_model

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("tokens_per_s", "peak_mem_mb", "mfu")


class WithParityHead(nn.Module):
    """The language model plus a head guessing whether a window's first token is odd."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.head = nn.Linear(lm.cfg.dim, 2)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.lm(batch["x"], output="hidden")
        return self.lm(batch["x"], batch["y"])[1], self.head(hidden[:, -1])


class ParityHeadObjective(PretrainObjective):
    """LM loss plus a classification head; best/ is the highest held-out accuracy."""

    best_metric = "val_accuracy"
    higher_is_better = True

    def setup(self, model, run):
        torch.manual_seed(run.cfg.seed)
        return WithParityHead(model).to(run.device)

    def _scores(self, module, batch):
        lm_loss, logits = module(batch)
        labels = batch["x"][:, 0] % 2
        return lm_loss, logits, labels

    def loss(self, module, batch):
        lm_loss, logits, labels = self._scores(module, batch)
        accuracy = (logits.argmax(-1) == labels).float().mean()
        return lm_loss + nn.functional.cross_entropy(logits, labels), {"accuracy": float(accuracy)}

    @torch.no_grad()
    def evaluate(self, module, run):
        right = total = 0
        for batch in self.eval_batches():
            _, logits, labels = self._scores(module, batch)
            right += int((logits.argmax(-1) == labels).sum())
            total += len(labels)
        return {"val_accuracy": right / total}


class SelfTalkObjective(Objective):
    """Each step generates continuations of fixed prompts with the current weights (seeded by the step), then
    trains on them: the shape of a rollout-based method."""

    best_metric = "val_reply_tokens"
    higher_is_better = True

    def __init__(self, seed: int):
        self.seed, self.rollouts, self.events = seed, None, []

    def before_step(self, module, step, run):
        assert not torch.is_grad_enabled()
        self.events.append(("hook", step))
        cfg = GenerationConfig(max_new_tokens=12, temperature=1.0, seed=self.seed * 1000 + step)
        prompts = [[1 + (step + i) % 60, 2 + i] for i in range(4)]
        outs = generate_batch(module, prompts, cfg)
        width = max(len(p) + len(o) for p, o in zip(prompts, outs, strict=True))
        rows = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, (p, o) in enumerate(zip(prompts, outs, strict=True)):
            rows[i, :len(p) + len(o)] = torch.tensor(p + o)
        self.rollouts = rows
        self.mean_len = sum(len(o) for o in outs) / len(outs)

    def train_batch(self, first, count):
        self.events.append(("batch", first))
        rows = self.rollouts[first % len(self.rollouts):][:count]
        y = rows[:, 1:].clone()
        y[y == 0] = -100
        return {"x": rows[:, :-1], "y": y}

    def loss(self, module, batch):
        loss = module(batch["x"], batch["y"])[1]
        return loss, {"reply_tokens": self.mean_len}

    def evaluate(self, module, run):
        return {"val_reply_tokens": self.mean_len}


def objective_for(kind: str, cfg):
    if kind == "head":
        return ParityHeadObjective(cfg.data.path, cfg.data.seq_len, cfg.seed, cfg.eval_batches, cfg.batch_size)
    return SelfTalkObjective(cfg.seed)


def run_kind(kind: str, tmp: str, out: str, resume: bool = False, steps: int = 40):
    """Train one of the test objectives (also the entry point of the killed subprocess)."""
    tmp = Path(tmp)
    cfg = tiny_cfg(tmp, out, max_steps=steps, save_every=2, eval_every=5, log_every=1, threads=1)
    if kind == "generate":
        cfg.batch_size = 4
    cfg, model = build_model(cfg, 64, torch.device("cpu"))
    return train(cfg, objective_for(kind, cfg), model, tmp / "tok", resume=resume, stage=kind)


def rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run_dir / "log.jsonl").read_text().splitlines()]


def kill_after_first_checkpoint(kind: str, tmp: Path, out: str) -> None:
    code = f"from tests.test_objectives import run_kind; run_kind({kind!r}, {str(tmp)!r}, {out!r})"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (tmp / out / "latest").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"


@pytest.mark.parametrize("kind", ["head", "generate"])
def test_sigkill_then_resume_gives_the_same_metrics_and_weights(tmp_path, kind):
    make_packed(tmp_path)
    run_kind(kind, tmp_path, "full")
    kill_after_first_checkpoint(kind, tmp_path, "killed")
    assert not (tmp_path / "killed" / "done.json").exists()
    run_kind(kind, tmp_path, "killed", resume=True)
    assert rows(tmp_path / "killed") == rows(tmp_path / "full")
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_head_objective_logs_its_metric_and_keeps_the_most_accurate_weights(tmp_path):
    make_packed(tmp_path)
    summary = run_kind("head", tmp_path, "run", steps=30)
    out = tmp_path / "run"
    log = rows(out)
    assert all("accuracy" in r for r in log if "loss" in r)
    evals = [r for r in log if "val_accuracy" in r]
    best = max(evals, key=lambda r: r["val_accuracy"])  # the first of equals: only a strict gain replaces best
    assert json.loads((out / "best" / "best.json").read_text())["step"] == best["step"]
    assert summary["best_val_accuracy"] == pytest.approx(best["val_accuracy"], abs=1e-6)
    assert set(load_file(str(out / "best" / "heads.safetensors"))) == {"head.weight", "head.bias"}
    assert (out / "best" / "model.safetensors").is_file()  # the language model stays a plain HF checkpoint


def test_per_step_hook_runs_once_per_optimizer_step_before_the_micro_batches(tmp_path):
    make_packed(tmp_path)
    cfg = tiny_cfg(tmp_path, "run", max_steps=5, grad_accum=2, batch_size=2, eval_every=5, log_every=1)
    cfg, model = build_model(cfg, 64, torch.device("cpu"))
    objective = SelfTalkObjective(0)
    train(cfg, objective, model, tmp_path / "tok", stage="generate")
    # one rollout per optimizer step, then its two micro-batches of 2 rows (global batch 4)
    assert objective.events == [e for step in range(5) for e in
                                (("hook", step), ("batch", 4 * step), ("batch", 4 * step + 2))]
