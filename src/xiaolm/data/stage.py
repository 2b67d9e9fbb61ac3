"""A data stage's bookkeeping: whether an earlier run already did the work, and marking a run done.

Every stage ends the same way: the shards' rejects become one rejects.jsonl with their counts and examples
merged (`gather_rejects`), the stage builds its report from them, and `finish_stage` writes it with the config and
the _SUCCESS marker. Between the two a stage may still stop (nothing usable came out), leaving no marker.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xiaolm.io import atomic_write_json, atomic_write_text, concat_files
from xiaolm.records.inputs import finished_stage, inputs_fingerprint, stage_inputs
from xiaolm.records.rejects import merge_examples

log = logging.getLogger(__name__)


def plan_stage(stage: str, inputs: Sequence[str | Path], out_dir: Path, cfg: Any
               ) -> tuple[list[Path], list[dict], str, dict | None]:
    """A configured stage's input files, their fingerprint, its config as YAML, and the report.json of an earlier
    run with the same config and inputs when that run completed (then there is nothing to do)."""
    import yaml

    from xiaolm.config import config_to_dict

    files = stage_inputs(inputs, out_dir)
    fingerprint = inputs_fingerprint(files)
    config_text = yaml.safe_dump(config_to_dict(cfg), allow_unicode=True, sort_keys=False)
    report = finished_stage(out_dir, config_text, fingerprint, "report.json")
    if report is not None:
        log.info("%s: %s is up to date (same inputs and config); skipping", stage, out_dir)
    return files, fingerprint, config_text, report


def gather_rejects(out_dir: Path, shard_dirs: Sequence[Path], shards: Sequence[dict],
                   examples: Sequence[str] = ("examples",)) -> tuple[Counter[str], dict[str, list]]:
    """The shards' rejects.jsonl joined in shard order into out_dir/rejects.jsonl; (their `rejected` counts summed,
    the examples under each of their `examples` keys merged into one dict)."""
    concat_files([d / "rejects.jsonl" for d in shard_dirs], out_dir / "rejects.jsonl")
    rejected: Counter[str] = Counter()
    merged: dict[str, list] = {}
    for shard in shards:
        rejected.update(shard["rejected"])
        for key in examples:
            merge_examples(merged, shard[key])
    return rejected, merged


def finish_stage(out_dir: Path, work: Path, config_text: str, report: dict, record: str = "report.json") -> None:
    """Mark a run done: its report (`record`: report.json or meta.json), config.yaml, then _SUCCESS; the work
    dir (intermediate files, possibly a copy of the corpus) is removed."""
    atomic_write_json(out_dir / record, report)
    atomic_write_text(out_dir / "config.yaml", config_text)
    atomic_write_text(out_dir / "_SUCCESS", "")
    shutil.rmtree(work)
