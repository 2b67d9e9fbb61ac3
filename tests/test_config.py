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


def test_model_arch_picks_the_config_class_and_unknown_arch_names_the_known_ones():
    from xiaolm.model.llama import LlamaConfig

    cfg = load_config(TrainConfig, None, ["model.arch=llama", "model.dim=64"])
    assert type(cfg.model) is LlamaConfig and cfg.model.dim == 64
    with pytest.raises(XiaolmError, match="unknown model.arch='gpt9'.*llama"):
        load_config(TrainConfig, None, ["model.arch=gpt9"])


@pytest.mark.parametrize("pair,allowed", [("schedule=linear", "cosine, wsd"), ("dtype=fp8", "auto, fp32, bf16, fp16"),
                                          ("parallel=tp", "ddp, fsdp"), ("compile=maybe", "auto, true, false")])
def test_enum_settings_are_checked_when_parsed_naming_the_allowed_values(pair, allowed):
    with pytest.raises(XiaolmError, match=f"use one of {allowed}"):
        load_config(TrainConfig, None, [pair])


def test_yaml_booleans_are_accepted_for_compile(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("compile: true\n")
    assert load_config(TrainConfig, f).compile == "true"


def test_list_values_are_converted_to_their_element_type():
    cfg = load_config(TrainConfig, None, ["freeze=embeddings,layers.0-1", "lora.targets=[q_proj, v_proj]"])
    assert cfg.freeze == ["embeddings", "layers.0-1"] and cfg.lora.targets == ["q_proj", "v_proj"]
    from dataclasses import dataclass, field

    @dataclass
    class Ints:
        ids: list[int] = field(default_factory=list)

    assert load_config(Ints, None, ["ids=1,2,3"]).ids == [1, 2, 3]
    with pytest.raises(XiaolmError, match=r"'ids\[1\]'"):
        load_config(Ints, None, ["ids=[1, two]"])


def test_build_model_leaves_the_given_config_unchanged():
    import torch

    from xiaolm.train.stage import build_model

    cfg = load_config(TrainConfig, None, ["model.dim=32", "model.n_layers=1", "model.n_heads=4",
                                          "model.n_kv_heads=2", "model.max_seq_len=64", "data.seq_len=32"])
    resolved, model = build_model(cfg, 123, torch.device("cpu"))
    assert cfg.model.vocab_size == TrainConfig().model.vocab_size != 123
    assert resolved.model.vocab_size == 123 == model.cfg.vocab_size
