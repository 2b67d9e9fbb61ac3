"""The shipped recipes load as the stages' configs (no unknown keys, right types), and the parameter counts
stated for them (the README's recipe table, each recipe's header comment) are the models' real counts."""

import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from xiaolm.config import load_config
from xiaolm.model.registry import build_model_from_config
from xiaolm.train.config import TrainConfig

ROOT = Path(__file__).parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
# | `llama-26m.yaml` | 26.7M (22.6M) | d512, 8 layers, ... | 8,192 | 512 | ... |
ROW = re.compile(r"^\| `([\w.-]+\.yaml)`[^|]* \| ([\d.]+)M \(([\d.]+)M\) \|[^|]+\| ([\d,]+) \|", re.M)


def recipe_table() -> dict[str, tuple[str, str, int]]:
    """README recipe table: file → (params, non-embedding params, vocabulary), as written."""
    rows = ROW.findall((ROOT / "README.md").read_text(encoding="utf-8"))
    return {name: (total, body, int(vocab.replace(",", ""))) for name, total, body, vocab in rows}


def millions(n: int, written: str) -> str:
    """n in millions, rounded to as many decimals as `written` shows."""
    decimals = len(written.partition(".")[2])
    return f"{n / 1e6:.{decimals}f}"


def counts(path: Path, vocab: int) -> tuple[int, int]:
    """(all, non-embedding) parameters of the recipe's model at this vocabulary, built without memory."""
    cfg = load_config(TrainConfig, path)
    with torch.device("meta"):
        model = build_model_from_config(replace(cfg.model, vocab_size=vocab))
    return model.num_params(), model.num_params(exclude_embeddings=True)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_recipe_loads(path):
    cfg = load_config(TrainConfig, path)
    assert cfg.max_steps > 0 and cfg.data.path


def test_readme_recipe_table_states_the_real_parameter_counts():
    table = recipe_table()
    assert {"pretrain.yaml", "llama-26m.yaml", "llama-100m.yaml"} <= table.keys()
    for name, (total, body, vocab) in table.items():
        n, n_body = counts(ROOT / "configs" / name, vocab)
        assert (millions(n, total), millions(n_body, body)) == (total, body), name


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name.startswith("llama-")], ids=lambda p: p.name)
def test_recipe_header_states_the_real_parameter_counts(path):
    head = path.read_text(encoding="utf-8")
    total, body = re.search(r"~([\d.]+)M-parameter .*\(([\d.]+)M without the embedding table\)", head).groups()
    vocab = int(re.search(r"Tokenizer: ([\d,]+) tokens", head).group(1).replace(",", ""))
    assert recipe_table()[path.name][2] == vocab
    n, n_body = counts(path, vocab)
    assert (millions(n, total), millions(n_body, body)) == (total, body)
