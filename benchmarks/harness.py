"""What the benchmarks here share: `--quick` sizes, the machine and command on top, a Markdown table at the end."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# The recipes' tokenizer sizes (configs/llama-*.yaml leave the vocabulary to the tokenizer): the embedding and the
# logits cost what they cost there.
RECIPE_VOCAB = {"26m": 8192, "100m": 32000}
# `xiaolm demo`'s model (src/xiaolm/demo.py): 4.0M parameters
DEMO_SHAPE = dict(vocab_size=4096, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256, tie_embeddings=True)
SHAPES = ("demo", *RECIPE_VOCAB)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows the module docstring as written and every option's default."""


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose --help is the script's docstring followed by the options and their defaults."""
    return argparse.ArgumentParser(description=doc, formatter_class=_HelpFormatter)


def parse_args(parser: argparse.ArgumentParser, quick: dict[str, Any], duration: str) -> argparse.Namespace:
    """Parse with a `--quick` flag that swaps the full-size defaults for `quick` (options given still win)."""
    sizes = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in quick.items())
    parser.add_argument("--quick", action="store_true",
                        help=f"{sizes}: {duration} on 2 idle cores (an estimate)")
    if parser.parse_known_args()[0].quick:
        parser.set_defaults(**quick)
    return parser.parse_args()


def recipe_shape(size: str) -> dict[str, Any]:
    """LlamaConfig fields of configs/llama-{size}.yaml's model (26m, 100m) with the recipe's vocabulary."""
    from xiaolm.config import load_config
    from xiaolm.train.config import TrainConfig

    model = load_config(TrainConfig, REPO / "configs" / f"llama-{size}.yaml").model
    fields = ("dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len", "tie_embeddings")
    return {"vocab_size": RECIPE_VOCAB[size], **{k: getattr(model, k) for k in fields}}


def model_shape(name: str) -> dict[str, Any]:
    """LlamaConfig fields of a shape of SHAPES: the demo's model or a recipe's."""
    return dict(DEMO_SHAPE) if name == "demo" else recipe_shape(name)


def run_json(argv: list[str]) -> dict[str, Any]:
    """Run a subprocess and parse the last line it printed as JSON; on failure, exit with its stderr's tail."""
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{shlex.join(argv)} failed (exit code {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def proc_status_mb(key: str, pid: int | str = "self") -> float:
    """VmRSS (now) or VmHWM (peak so far, of the process's own memory since exec) of a process in MB (Linux);
    0 for a process that is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            return next((int(line.split()[1]) / 1024 for line in f if line.startswith(key + ":")), 0.0)
    except OSError:
        return 0.0


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def load_average() -> str:
    """The 1-minute load average, or '?' where the OS has none."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"


def git_commit() -> str:
    """The checkout's commit, '-dirty' when it has uncommitted changes; '?' outside a git checkout."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def print_header(packages: tuple[str, ...] = ("torch", "transformers"), threads: str | None = None) -> None:
    """The command as typed, then the machine: platform, CPU, cores, threads, load, versions, commit.

    threads: how the benchmark's threads are set, printed as given; None: torch's GPU and thread count (imports torch).
    """
    versions = []
    for name in packages:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} not installed")
    if threads is None:
        import torch

        gpu = f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "no GPU"
        threads = f"{gpu}, {torch.get_num_threads()} torch threads"
    print(f"command: {shlex.join(['python', *sys.argv])}")
    print(f"machine: {platform.platform()}, {cpu_name()}, {os.cpu_count()} CPUs, {threads}, "
          f"load {load_average()} at start")
    print(f"software: Python {platform.python_version()}, {', '.join(versions)}, commit {git_commit()}")


def spread(values: list[float], fmt: str = "{:,.0f}") -> str:
    """'median (min–max)' of the values."""
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def one_or_spread(values: list[float], fmt: str = "{:,.0f}", same: bool = False) -> str:
    """spread() of the values; the value alone when there is one (or, with `same`, when all are equal)."""
    return fmt.format(values[0]) if len(values) == 1 or same and len(set(values)) == 1 else spread(values, fmt)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table, ready to paste into benchmarks/RESULTS.md."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
