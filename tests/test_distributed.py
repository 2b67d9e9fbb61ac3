"""torchrun with 2 CPU processes (gloo), DDP or FSDP2, follows the same loss trajectory as 1 process with the same
global batch, and its checkpoints resume on a different number of processes."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_train_loop import losses, make_packed

TOLERANCE = 1e-5  # fp32 all-reduce of two half-batch means vs one full-batch mean (log rounds to 1e-6)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MODELS = {"llama": ["model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
                     "model.max_seq_len=32"],
          "t5": ["model.arch=t5", "model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.head_dim=8",
                 "model.ffn_dim=64", "model.max_seq_len=32"]}


def pretrain_args(tmp_path, out: str, batch_size: int, arch: str = "llama") -> list[str]:
    return ["pretrain", f"out={tmp_path / out}", f"data.path={tmp_path / 'packed'}",
            f"data.tokenizer={tmp_path / 'tok'}", "data.seq_len=32", "device=cpu", "dtype=fp32", "max_steps=6",
            f"batch_size={batch_size}", "lr=3e-3", "warmup_steps=2", "log_every=1", "eval_every=3",
            "eval_batches=1", "save_every=3", *MODELS[arch]]


def xiaolm(args: list[str], processes: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={processes}",
                     f"--master_port={free_port()}"]
    done = subprocess.run([*launcher, "-m", "xiaolm", *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def max_gap(a, b) -> float:
    assert [s for s, _ in a] == [s for s, _ in b]
    return max(abs(x - y) for (_, x), (_, y) in zip(a, b, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("parallel,arch", [("ddp", "llama"), ("fsdp", "llama"), ("ddp", "t5")])
def test_two_processes_match_single_process(tmp_path, parallel, arch):
    make_packed(tmp_path)
    # the loop averages each micro-batch's mean loss: a T5's rows hold different numbers of targets (each window
    # is cut at its own point), so one process gets the same two micro-batches of 4 rows as the two processes
    single = pretrain_args(tmp_path, "single", 8, arch) if arch == "llama" else \
        [*pretrain_args(tmp_path, "single", 4, arch), "grad_accum=2"]
    xiaolm(single)
    xiaolm([*pretrain_args(tmp_path, "multi", 4, arch), f"parallel={parallel}"], processes=2)
    a, b = losses(tmp_path / "single"), losses(tmp_path / "multi")
    assert [s for s, _ in a] == list(range(1, 7))
    assert max_gap(a, b) < TOLERANCE
    assert (tmp_path / "multi" / "checkpoints" / "step-6" / "model.safetensors").is_file()


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_on_one_process(tmp_path):
    make_packed(tmp_path)
    common = ["global_batch_size=8", "keep_last=3"]
    xiaolm([*pretrain_args(tmp_path, "single", 4), *common])  # 1 process: 2 passes of 4 per step
    xiaolm([*pretrain_args(tmp_path, "fsdp", 4), *common, "parallel=fsdp"], processes=2)
    two = losses(tmp_path / "fsdp")
    run = tmp_path / "fsdp"
    shutil.rmtree(run / "checkpoints" / "step-6")  # as if the 2-process run had died after step 3
    (run / "done.json").unlink()
    xiaolm([*pretrain_args(tmp_path, "fsdp", 4), *common, "--resume"])
    resumed = losses(run)
    assert [s for s, _ in resumed] == list(range(1, 7))
    assert max_gap(resumed, two) < TOLERANCE
    assert max_gap(resumed, losses(tmp_path / "single")) < TOLERANCE


@pytest.mark.slow
def test_grpo_on_two_processes_draws_and_learns_what_one_process_does(tmp_path, tiny_tokenizer_dir, monkeypatch):
    from tests.test_dpo import VOCAB, hf_dir, log_rows, write_jsonl
    from tests.test_export import make_model
    from tests.test_grpo import prompts

    hf_dir(tmp_path, tiny_tokenizer_dir, make_model(VOCAB))
    write_jsonl(tmp_path / "prompts.jsonl", prompts(40))
    repo = str(Path(__file__).parents[1])  # the processes import the test's reward function
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))

    def args(out: str, batch_size: int) -> list[str]:
        return ["grpo", f"out={tmp_path / out}", f"init_from={tmp_path / 'base'}",
                f"data.path={tmp_path / 'prompts.jsonl'}", "data.val_fraction=0.2", "data.seq_len=64", "device=cpu",
                "dtype=fp32", "max_steps=4", f"batch_size={batch_size}", "lr=3e-3", "warmup_steps=0", "log_every=1",
                "eval_every=4", "save_every=4", "rl.max_new_tokens=12", 'rl.rewards=["tests.rl_rewards:long_reply"]',
                "rl.eval_prompts=8", "grpo.group_size=4", "grpo.loss=grpo"]

    xiaolm(args("single", 8))
    xiaolm(args("multi", 4), processes=2)  # each process samples and trains its own prompt's group
    one, two = log_rows(tmp_path / "single"), log_rows(tmp_path / "multi")
    assert [r["reward"] for r in one] == pytest.approx([r["reward"] for r in two], abs=1e-6)  # the same samples
    assert max_gap(losses(tmp_path / "single"), losses(tmp_path / "multi")) < TOLERANCE
    assert len({r["reward"] for r in one}) > 1  # the policy moved: later samples differ
