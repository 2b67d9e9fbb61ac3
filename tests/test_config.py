"""Configs: defaults, YAML, key=value overrides, and clear refusals."""

import pytest

from xiaolm.config import load_config, parse_overrides
from xiaolm.errors import XiaolmError
from xiaolm.train.config import TrainConfig


def test_overrides_reach_nested_fields_with_types(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("max_steps: 10\nmodel:\n  dim: 64\n")
    cfg = load_config(TrainConfig, f, ["model.n_layers=3", "lr=3e-4", "data.path=x"])
    assert cfg.max_steps == 10 and cfg.model.dim == 64 and cfg.model.n_layers == 3
    assert cfg.lr == pytest.approx(3e-4) and cfg.data.path == "x"


def test_unknown_key_names_the_key():
    with pytest.raises(XiaolmError, match="unknown config key 'model.depth'"):
        load_config(TrainConfig, None, ["model.depth=3"])


def test_bad_value_names_the_key():
    with pytest.raises(XiaolmError, match="'max_steps'"):
        load_config(TrainConfig, None, ["max_steps=lots"])


def test_missing_config_file_is_clear(tmp_path):
    with pytest.raises(XiaolmError, match="config file not found"):
        load_config(TrainConfig, tmp_path / "nope.yaml")


def test_override_without_equals_is_refused():
    with pytest.raises(XiaolmError, match="key=value"):
        parse_overrides(["max_steps"])
