"""A pretraining process killed with SIGKILL mid-run and resumed reproduces the uninterrupted run bitwise:
the logged losses, the final weights and the final optimizer state."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.test_distributed import pretrain_args
from tests.test_train_loop import assert_same_final_state, losses, make_packed


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    make_packed(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    extra = ["max_steps=150", "save_every=10", "eval_every=50"]
    full = subprocess.run([sys.executable, "-m", "xiaolm", *pretrain_args(tmp_path, "full", 4), *extra],
                          env=env, capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    args = [sys.executable, "-m", "xiaolm", *pretrain_args(tmp_path, "killed", 4), *extra]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "killed" / "latest"
    deadline = time.monotonic() + 120
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # wait for the first checkpoint, then kill wherever the run happens to be
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "killed" / "done.json").exists()
    resumed = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert losses(tmp_path / "killed") == losses(tmp_path / "full")
    assert_same_final_state(tmp_path / "full", tmp_path / "killed", tmp_path)
