"""A stage's input files: files, globs and directories expanded, their fingerprint, and whether a run is done."""

from __future__ import annotations

import glob
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from xiaolm.errors import XiaolmError

log = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".json", ".txt", ".csv", ".tsv", ".parquet")
COMPRESSIONS = (".gz", ".zst")
# files our own stages write next to their records; a directory or glob input skips them
ARTIFACTS = frozenset({"rejects.jsonl", "report.json", "meta.json"})


def base_suffix(path: Path) -> str:
    """The format suffix of a file name, past any compression ending: data.jsonl.gz → .jsonl."""
    name = path.name
    for ext in COMPRESSIONS:
        name = name.removesuffix(ext)
    return Path(name).suffix.lower()


def _is_record_file(path: Path, root: Path | None = None) -> bool:
    """A supported, visible, non-artifact file (hidden dirs below `root` are skipped too)."""
    if not path.is_file() or base_suffix(path) not in SUFFIXES or path.name in ARTIFACTS:
        return False
    parts = path.relative_to(root).parts if root is not None else (path.name,)
    return not any(p.startswith((".", "_")) for p in parts)


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files, globs and directories (recursive, sorted) → record files, each once, in input order."""
    if isinstance(inputs, str | Path):
        inputs = [inputs]
    files: list[Path] = []
    for item in inputs:
        text = str(item)
        if any(c in text for c in "*?["):
            matches = [Path(m) for m in sorted(glob.glob(text, recursive=True))]
            if not matches:
                raise XiaolmError("input not found", where=text, hint="the glob matches nothing")
            for m in matches:
                if m.is_dir():
                    files.extend(sorted(f for f in m.rglob("*") if _is_record_file(f, m)))
                elif _is_record_file(m):
                    files.append(m)
            continue
        path = Path(text)
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if _is_record_file(f, path))
            if not found:
                log.warning("%s: no .jsonl/.json/.txt/.csv/.tsv/.parquet files in this directory", path)
            files.extend(found)
        elif path.is_file():
            if base_suffix(path) not in SUFFIXES:
                raise XiaolmError(f"unsupported file type '{''.join(path.suffixes)}'", where=text,
                                  hint="use .jsonl, .json, .txt, .csv, .tsv (optionally .gz or .zst) or .parquet")
            files.append(path)
        else:
            raise XiaolmError("input not found", where=text, hint="pass existing files, globs or directories")
    seen: set[Path] = set()
    unique = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def inputs_fingerprint(inputs: Sequence[str | Path]) -> list[dict]:
    """Path, size and mtime of every input file: a stage reruns when this changes."""
    return files_fingerprint(expand_inputs(inputs))


def files_fingerprint(files: Sequence[Path]) -> list[dict]:
    """inputs_fingerprint of files already listed (whatever their names end in)."""
    out = []
    for f in files:
        st = f.stat()
        out.append({"path": str(f.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def stage_inputs(inputs: Sequence[str | Path], out_dir: Path) -> list[Path]:
    """A stage's input files, leaving out anything inside its own output dir (never read back as input)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise XiaolmError("output path exists and is not a directory", where=str(out_dir))
    out = out_dir.resolve()
    return [f for f in expand_inputs(inputs) if not f.resolve().is_relative_to(out)]


def finished_stage(out_dir: Path, config_text: str, fingerprint: list[dict], record: str,
                   required: Sequence[str] = ()) -> dict | None:
    """The saved `record` (report.json, meta.json) of a completed run with this config and these inputs, else None."""
    if not all((out_dir / f).is_file() for f in ("_SUCCESS", "config.yaml", record, *required)):
        return None
    if (out_dir / "config.yaml").read_text(encoding="utf-8") != config_text:
        return None
    saved = json.loads((out_dir / record).read_text(encoding="utf-8"))
    return saved if saved.get("inputs") == fingerprint else None
