"""torchrun with 2 CPU processes (gloo) follows the same loss trajectory as 1 process with the same global batch."""

import os
import socket
import subprocess
import sys

import pytest

from tests.test_train_loop import losses, make_packed

TOLERANCE = 1e-5  # fp32 all-reduce of two half-batch means vs one full-batch mean


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrain_args(tmp_path, out: str, batch_size: int) -> list[str]:
    return ["pretrain", f"out={tmp_path / out}", f"data.path={tmp_path / 'packed'}",
            f"data.tokenizer={tmp_path / 'tok'}", "data.seq_len=32", "device=cpu", "max_steps=6",
            f"batch_size={batch_size}", "lr=3e-3", "warmup_steps=2", "log_every=1", "eval_every=3",
            "eval_batches=1", "save_every=3", "model.dim=32", "model.n_layers=2", "model.n_heads=4",
            "model.n_kv_heads=2", "model.max_seq_len=32"]


@pytest.mark.slow
def test_two_process_gloo_matches_single_process(tmp_path):
    make_packed(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "xiaolm", *pretrain_args(tmp_path, "single", 8)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                          f"--master_port={free_port()}", "-m", "xiaolm", *pretrain_args(tmp_path, "ddp", 4)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    a, b = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 7))
    assert max(abs(x - y) for (_, x), (_, y) in zip(a, b, strict=True)) < TOLERANCE
    assert (tmp_path / "ddp" / "checkpoints" / "step-6").is_dir()
