"""Every benchmark in one command, and one dated section of benchmarks/RESULTS.md with what each one printed.

    python -m benchmarks [--full] [--only train_step,dedup] [--dry-run] [--out FILE]

Quick (the default): each benchmark at the small size of BENCHMARKS below, meant to take about 15 minutes in all on
2 idle cores; `--full`: the sizes the README quotes (the scripts' defaults; hours). Each script runs in its own
process from the repository root with src/ on PYTHONPATH, its output shown as it comes; a benchmark that fails is
reported as failed and the others still run. At the end one section, `## make bench, DATE (quick|full)`, goes into
the results file right after its introduction (before the first `## ` section): the machine, the versions, the
command, and per benchmark its command, wall time and the Markdown table(s) its output ends with (its last 30
lines when it printed none or failed). Exit status 1 when any benchmark failed.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import date
from importlib import metadata
from pathlib import Path
from typing import IO

from .harness import cpu_name, git_commit, load_average

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "transformers", "tokenizers", "datasketch", "datatrove")
TAIL_LINES = 30

DEDUP_SYSTEMS = ["--systems", "xiaolm,datasketch,datatrove"]  # datatrove: the README's comparison, same environment
# Its own work folder: data_pipeline.py keeps the corpus and the packing tokenizer there for the next run.
DATA_QUICK = ["--mb", "40", "--files", "4", "--work", "/tmp/xiaolm-databench-quick"]

# name: (script, quick arguments, --full arguments). Six scripts have a --quick flag; the scripts' defaults are the
# full sizes. memory_budget.py without --config runs its built-in recipes, those of RESULTS.md (--quick: the 100M
# model with activation checkpointing). Left out: clean_chats.py measures chat record files that the user brings
# (there is no corpus to run it on), chat_mix.py and numeral_directions.py start from a finished `xiaolm demo` run
# (~15 minutes alone), and inference_memory.py needs llama-cpp-python (the llama-cpp extra, which builds llama.cpp:
# ~15 minutes to install).
BENCHMARKS: dict[str, tuple[str, list[str], list[str]]] = {
    "train_step": ("benchmarks/train_step.py", ["--quick"], []),
    "learning_efficiency": ("benchmarks/learning_efficiency.py", ["--quick"], []),
    "memory_budget": ("benchmarks/memory_budget.py", ["--quick"], []),
    "dedup": ("benchmarks/dedup.py", ["--quick", *DEDUP_SYSTEMS], DEDUP_SYSTEMS),
    "tokenizer_train": ("benchmarks/tokenizer_train.py", ["--quick"], []),
    # quick: 2 rounds for a spread of the ratios (one round took 4.5 minutes with 1 thread on a loaded machine)
    "dpo_memory": ("benchmarks/dpo_memory.py", ["--size", "26m", "--rounds", "2", "--steps", "4"],
                   ["--size", "26m", "--rounds", "5"]),
    "data_pipeline": ("benchmarks/data_pipeline.py", ["throughput", *DATA_QUICK], ["throughput"]),
    "decode": ("benchmarks/decode.py", ["--quick"], []),
    # serve: a model dir with its tokenizer; `xiaolm demo` writes runs/demo/model
    "serve": ("benchmarks/serve.py", ["--quick"], []),
    # full: the README's 2 GB through clean, dedup and pack (the defaults are 1,000 MB in 16 files, 1 process)
    "data_pipeline_end_to_end": ("benchmarks/data_pipeline.py", ["end-to-end", *DATA_QUICK, "--workers", "2"],
                                 ["end-to-end", "--mb", "2000", "--files", "32", "--workers", "2"]),
    "eval_choice": ("benchmarks/eval_choice.py", ["--quick"], []),
}


@dataclass
class Outcome:
    """What one benchmark did: its command as shown, exit code, wall time and output lines."""

    name: str
    command: str
    returncode: int
    seconds: float
    stdout: list[str]
    output: list[str]  # stdout and stderr, in the order they came


def run_script(argv: list[str], root: Path) -> tuple[int, float, list[str], list[str]]:
    """Run argv from `root` with src/ on PYTHONPATH, echoing its output; (exit code, seconds, stdout, all lines)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root / "src"), os.environ.get("PYTHONPATH")]))
    stdout: list[str] = []
    both: list[str] = []
    lock = threading.Lock()

    def pump(pipe: IO[bytes], echo: IO[str], keep: list[str] | None) -> None:
        for raw in pipe:
            text = raw.decode("utf-8", "replace")
            echo.write(text)
            echo.flush()
            line = text.rstrip("\r\n").rsplit("\r", 1)[-1]  # a progress bar's last state
            with lock:
                both.append(line)
            if keep is not None:
                keep.append(line)

    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pumps = [threading.Thread(target=pump, args=(proc.stdout, sys.stdout, stdout)),
             threading.Thread(target=pump, args=(proc.stderr, sys.stderr, None))]
    for t in pumps:
        t.start()
    for t in pumps:
        t.join()
    returncode = proc.wait()
    return returncode, time.perf_counter() - start, stdout, both


def final_tables(lines: list[str]) -> list[str] | None:
    """The output from the first row of its last Markdown tables (tables apart only by blank lines) to the end."""
    rows = [i for i, line in enumerate(lines) if line.startswith("|")]
    if not rows:
        return None
    i = rows[-1]
    while i > 0 and (lines[i - 1].startswith("|") or not lines[i - 1].strip()):
        i -= 1
    while not lines[i].startswith("|"):
        i += 1
    out: list[str] = []
    for line in lines[i:]:
        # each printed line its own paragraph: Markdown reads a line right under a table as one more row
        if out and out[-1].strip() and line.strip() and not (out[-1].startswith("|") and line.startswith("|")):
            out.append("")
        out.append(line)
    while not out[-1].strip():
        out.pop()
    return out


def gpus() -> str:
    """The NVIDIA GPUs nvidia-smi names, else 'no NVIDIA GPU'."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return "no NVIDIA GPU"
    names = [n.strip() for n in out.stdout.splitlines() if n.strip()]
    return ", ".join(names) if out.returncode == 0 and names else "no NVIDIA GPU"


def ram() -> str:
    """Total memory from /proc/meminfo, or '? GB RAM' where there is none."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
        return f"{kb / 2**20:.1f} GB RAM"
    except (OSError, StopIteration, ValueError):
        return "? GB RAM"


def machine() -> str:
    return f"{platform.platform()}, {cpu_name()}, {os.cpu_count()} cores, {ram()}, {gpus()}"


def versions() -> str:
    found = [f"Python {platform.python_version()}"]
    for name in PACKAGES:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} not installed")
    return ", ".join(found) + f", xiaolm commit {git_commit()}"


def duration(seconds: float) -> str:
    s = round(seconds)
    return f"{s} s" if s < 120 else f"{s // 60} min {s % 60} s"


def section(mode: str, command: str, about: list[str], outcomes: list[Outcome]) -> str:
    """The Markdown section of one run: heading, the `about` lines (machine, versions, ...), then each benchmark."""
    failed = [o.name for o in outcomes if o.returncode != 0]
    ran = f"{len(outcomes)} benchmark{'s' * (len(outcomes) != 1)} in {duration(sum(o.seconds for o in outcomes))}"
    about = [*about, f"Command: `{command}`: {ran}, "
             + (f"{len(failed)} failed ({', '.join(failed)})." if failed else "none failed.")]
    lines = [f"## make bench, {date.today().isoformat()} ({mode})", ""]
    for line in about:
        lines += [line, ""]
    for o in outcomes:
        tables = final_tables(o.stdout) if o.returncode == 0 else None
        status = duration(o.seconds) if o.returncode == 0 else (
            f"**failed** (exit code {o.returncode}) after {duration(o.seconds)}")
        lines += [f"### {o.name}: {status}", "", f"`{o.command}`", ""]
        if tables:
            lines += tables
        else:
            why = "No Markdown table in its output" if o.returncode == 0 else "Failed"
            lines += [f"{why}; the last {TAIL_LINES} lines it printed:", "", "```", *o.output[-TAIL_LINES:], "```"]
        lines.append("")
    return "\n".join(lines)


def insert_section(path: Path, text: str) -> None:
    """Put `text` after the file's introduction, before its first `## ` section; atomically (temp file + rename)."""
    old = path.read_text(encoding="utf-8") if path.exists() else "# Measured results\n"
    lines = old.splitlines(keepends=True)
    at = next((i for i, line in enumerate(lines) if line.startswith("## ")), len(lines))
    rest = "".join(lines[at:])
    new = "".join(lines[:at]).rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n" + ("\n" + rest if rest else "")
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.",
                                     delete=False) as f:
        f.write(new)
    os.chmod(f.name, mode)
    os.replace(f.name, path)


def main(argv: list[str] | None = None, benchmarks: dict[str, tuple[str, list[str], list[str]]] = BENCHMARKS,
         root: Path = REPO) -> int:
    """Run the chosen benchmarks one after the other, then write their section; 1 when any failed."""
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="the sizes the README quotes (hours), not the quick ones")
    p.add_argument("--only", help=f"comma-separated benchmarks to run, of: {', '.join(benchmarks)}")
    p.add_argument("--dry-run", action="store_true", help="print the commands; run and write nothing")
    p.add_argument("--out", type=Path, default=root / "benchmarks" / "RESULTS.md", help="the results file")
    args = p.parse_args(argv)
    names = list(benchmarks)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        if unknown := [n for n in names if n not in benchmarks]:
            p.error(f"--only: no benchmark named {', '.join(unknown)}; the benchmarks are {', '.join(benchmarks)}")
    mode = "full" if args.full else "quick"
    plan = {n: [benchmarks[n][0], *benchmarks[n][2 if args.full else 1]] for n in names}
    command = shlex.join(["python", "-m", "benchmarks", *(sys.argv[1:] if argv is None else argv)])
    if args.dry_run:
        print(f"{mode}: {len(plan)} benchmarks, from {root} with PYTHONPATH=src; the section would go to {args.out}")
        for name, cmd in plan.items():
            print(f"  {name:26s} {shlex.join(['python', *cmd])}")
        return 0

    about = [f"Machine: {machine()}; load average {load_average()} at the start"]
    outcomes = []
    for k, (name, cmd) in enumerate(plan.items(), 1):
        shown = shlex.join(["python", *cmd])
        print(f"\n=== benchmarks [{k}/{len(plan)}] {name}: {shown}", flush=True)
        rc, seconds, stdout, output = run_script([sys.executable, *cmd], root)
        print(f"=== {name}: {'exit code 0' if rc == 0 else f'FAILED, exit code {rc}'}, {duration(seconds)}", flush=True)
        outcomes.append(Outcome(name, shown, rc, seconds, stdout, output))
    about[0] += f", {load_average()} at the end."
    about.append(f"Versions: {versions()}.")
    insert_section(args.out, section(mode, command, about, outcomes))
    failed = [o.name for o in outcomes if o.returncode != 0]
    print(f"\nbenchmarks: {mode} section written to {args.out}"
          + (f"; {len(failed)} failed: {', '.join(failed)} (their output's tail is in the section)" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
