"""What a run shows: log.jsonl rows, TensorBoard / W&B sinks, the loss plot, MFU's peak FLOP/s."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from xiaolm.errors import XiaolmError
from xiaolm.io import atomic_write_text

# Dense bf16 peaks (TFLOP/s) from the vendors' data sheets, matched against torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0,
               "A10": 125.0, "L4": 121.0, "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 125.0, "T4": 65.0}


def peak_flops(peak_tflops: float, device: torch.device) -> float | None:
    """The device's peak FLOP/s for MFU: peak_tflops if set, else a known GPU's data-sheet figure."""
    if peak_tflops > 0:
        return peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


def plot_losses(log_path: Path, out_png: Path, title: str = "", val_key: str = "val_loss",
                train_key: str = "loss") -> None:
    """Draw the training metric `train_key` (the loss) and the validation metric `val_key` from log.jsonl into a
    PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [(r["step"], r[train_key]) for r in rows if train_key in r]
    val = [(r["step"], r[val_key]) for r in rows if val_key in r]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=False), label="train" if train_key == "loss" else train_key, linewidth=1)
    if val:
        other = ax if val_key == "val_loss" else ax.twinx()  # a metric other than loss gets its own axis
        other.plot(*zip(*val, strict=False), "o-", color="C1", label=val_key, linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel(train_key)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.legend(loc="upper right")
    fig.tight_layout()
    tmp = out_png.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out_png)


Sink = Callable[[dict[str, float] | None, int], None]


def metric_sinks(run_dir: Path, wandb_project: str = "", config: dict[str, Any] | None = None) -> list[Sink]:
    """Metric sinks: TensorBoard (`tensorboard --logdir runs/`), and W&B when wandb_project is set.

    Each takes (metrics, step); (None, step) closes it.
    """
    from torch.utils.tensorboard import SummaryWriter

    tb = SummaryWriter(str(run_dir / "tb"))

    def to_tensorboard(metrics: dict[str, float] | None, step: int) -> None:
        if metrics is None:
            tb.close()
            return
        for key, value in metrics.items():
            tb.add_scalar(key, value, step)
        tb.flush()

    sinks = [to_tensorboard]
    if wandb_project:
        try:
            import wandb
        except ImportError:
            raise XiaolmError("wandb_project is set but wandb is not installed", where="wandb_project",
                              hint="pip install wandb, or leave wandb_project empty") from None
        wandb_run = wandb.init(project=wandb_project, name=run_dir.name, dir=str(run_dir), config=config,
                               resume="allow")

        def to_wandb(metrics: dict[str, float] | None, step: int) -> None:
            if metrics is None:
                wandb_run.finish()
            else:
                wandb_run.log(metrics, step=step)

        sinks.append(to_wandb)
    return sinks


def truncate_log(log_path: Path, step: int) -> None:
    """Drop log rows written after the checkpoint being resumed, so the log tells one trajectory."""
    if not log_path.exists():
        return
    keep = [line for line in log_path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic_write_text(log_path, "".join(line + "\n" for line in keep))
