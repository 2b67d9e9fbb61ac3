"""The shipped recipes load as the stages' configs (no unknown keys, right types)."""

from pathlib import Path

import pytest

from xiaolm.config import load_config
from xiaolm.train.config import TrainConfig

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_recipe_loads(path):
    cfg = load_config(TrainConfig, path)
    assert cfg.max_steps > 0 and cfg.data.path
