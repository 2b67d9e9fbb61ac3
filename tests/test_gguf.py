"""GGUF export, read back with gguf's own reader: metadata, tensor layout, dtypes, the pre-tokenizer guard."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, TokenType
from gguf.quants import dequantize

from tests.test_cli import error_line
from tests.test_export import make_model, make_run_dir
from xiaolm.errors import XiaolmError
from xiaolm.model.gguf import LLAMA_CPP_PRE, export_gguf, rope_permute, rope_unpermute
from xiaolm.model.llama import apply_rope, rope_tables

# mixed text: the character-level tokenizer merges Latin words and punctuation, never CJK characters
GGUF_TEXTS = [
    "你好，世界！今天天气很好。",
    "我们一起学习中文和数学。12+35=47。",
    "Hello world, hello model: say hello!",
    "小模型也能说话。The small model speaks Chinese and English.",
    "春眠不觉晓，处处闻啼鸟。 2026年12月。\n",
]


def train_chars_tokenizer(root: Path, **rules) -> Path:
    """A 320-token tokenizer with one token per CJK character (the demo's setting) unless `rules` say otherwise."""
    from xiaolm.tokenizer import train_tokenizer

    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in GGUF_TEXTS * 5),
                      encoding="utf-8")
    return train_tokenizer([corpus], root / "tokenizer", vocab_size=320, min_frequency=1,
                           **(rules or {"cjk_chars": True}))


@pytest.fixture(scope="module")
def chars_tokenizer_dir(tmp_path_factory) -> Path:
    return train_chars_tokenizer(tmp_path_factory.mktemp("chartok"))


def fields(reader: GGUFReader) -> dict:
    return {name: f.contents() for name, f in reader.fields.items()}


@pytest.mark.parametrize("tie", [True, False])
def test_gguf_holds_llama_metadata_and_the_tokenizer(tmp_path, chars_tokenizer_dir, tie):
    model = make_model(320, tie=tie)
    path = export_gguf(make_run_dir(tmp_path, model, chars_tokenizer_dir), tmp_path / "out", dtype="f32")
    assert path == tmp_path / "out" / "model.gguf"
    assert 'PARAMETER stop "<|im_end|>"' in (tmp_path / "out" / "Modelfile").read_text()  # for `ollama create`
    reader = GGUFReader(path)
    f = fields(reader)
    cfg = model.cfg
    assert f["general.architecture"] == "llama" and f["general.file_type"] == 0
    assert (f["llama.context_length"], f["llama.embedding_length"], f["llama.block_count"]) == (64, 64, 2)
    assert f["llama.feed_forward_length"] == cfg.hidden_dim and f["llama.rope.dimension_count"] == cfg.head_dim
    assert (f["llama.attention.head_count"], f["llama.attention.head_count_kv"]) == (4, 2)
    assert f["llama.rope.freq_base"] == cfg.rope_theta and f["llama.vocab_size"] == 320
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps)
    tok = json.loads((chars_tokenizer_dir / "tokenizer.json").read_text())
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == LLAMA_CPP_PRE
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert all(tokens[i] == t for t, i in tok["model"]["vocab"].items())
    assert f["tokenizer.ggml.merges"] == [" ".join(m) for m in tok["model"]["merges"]]
    assert tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert types[:3] == [TokenType.CONTROL] * 3 and set(types[10:]) == {TokenType.NORMAL}
    assert (f["tokenizer.ggml.eos_token_id"], f["tokenizer.ggml.padding_token_id"]) == (0, 0)
    assert f["tokenizer.ggml.eot_token_id"] == 2 and f["tokenizer.ggml.add_bos_token"] is False
    assert "<|im_start|>" in f["tokenizer.chat_template"]
    names = {t.name for t in reader.tensors}
    assert ("output.weight" in names) is not tie  # llama.cpp reuses token_embd for a missing output head
    assert len(names) == 2 + (not tie) + 9 * cfg.n_layers


def read_state(path: Path, model) -> dict[str, torch.Tensor]:
    """The GGUF tensors as float32 under llama.cpp names, q/k un-permuted back to HF's layout."""
    out = {}
    for t in GGUFReader(path).tensors:
        a = t.data if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) \
            else dequantize(t.data, t.tensor_type)
        w = torch.from_numpy(np.array(a, dtype=np.float32)).reshape([int(n) for n in reversed(t.shape)])
        if t.name.endswith("attn_q.weight"):
            w = rope_unpermute(w, model.cfg.n_heads)
        elif t.name.endswith("attn_k.weight"):
            w = rope_unpermute(w, model.cfg.n_kv_heads)
        out[t.name] = w
    return out


def hf_state(model) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    hf = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"],
          "output.weight": sd["lm_head.weight"]}
    parts = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    for i in range(model.cfg.n_layers):
        for gg, name in parts.items():
            hf[f"blk.{i}.{gg}.weight"] = sd[f"model.layers.{i}.{name}.weight"]
    if model.cfg.tie_embeddings:
        del hf["output.weight"]
    return hf


def test_f32_tensors_round_trip_to_our_weights(tmp_path, chars_tokenizer_dir):
    model = make_model(320, tie=False)
    path = export_gguf(make_run_dir(tmp_path, model, chars_tokenizer_dir), tmp_path / "m.gguf", dtype="f32")
    back, ours = read_state(path, model), hf_state(model)
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[k], ours[k]) for k in ours)


def test_f16_and_q8_0_keep_norms_in_f32_and_stay_close(tmp_path, chars_tokenizer_dir):
    model = make_model(320, tie=True)
    run = make_run_dir(tmp_path, model, chars_tokenizer_dir)
    ours = hf_state(model)
    for dtype, kind, file_type in [("f16", GGMLQuantizationType.F16, 1), ("q8_0", GGMLQuantizationType.Q8_0, 7)]:
        path = export_gguf(run, tmp_path / f"m-{dtype}.gguf", dtype=dtype)
        reader = GGUFReader(path)
        assert fields(reader)["general.file_type"] == file_type
        for t in reader.tensors:
            assert t.tensor_type == (GGMLQuantizationType.F32 if len(t.shape) == 1 else kind), t.name
        back = read_state(path, model)
        for name, w in ours.items():
            err = (back[name] - w).abs()
            if dtype == "f16":
                assert torch.equal(back[name], w.half().float()), name
            else:  # per block of 32: step = absmax / 127, rounding costs half a step, the step stored as f16
                step = w.reshape(-1, 32).abs().amax(dim=1, keepdim=True) / 127  # up to 127 · 2⁻¹¹ steps more
                assert (err.reshape(-1, 32) <= step * (0.5 + 127 / 2048) + 1e-7).all(), name
    assert path.stat().st_size < (tmp_path / "m-f16.gguf").stat().st_size


def test_permuted_q_k_under_llama_cpps_rope_match_ours():
    """llama.cpp rotates pairs (2i, 2i+1) of a head; HF pairs (i, i + d/2): the permutation maps one to the other."""
    torch.manual_seed(0)
    heads, hd, t = 2, 8, 5
    q = torch.randn(1, heads, t, hd)
    cos, sin = rope_tables(hd, t, 10000.0)
    ours = apply_rope(q, cos, sin)  # [1, heads, t, hd]
    w = q[0].permute(0, 2, 1).reshape(heads * hd, t)  # rows as a projection's output dims
    p = rope_permute(w, heads).reshape(heads, hd, t).permute(0, 2, 1)  # [heads, t, hd], llama.cpp's layout
    theta = 10000.0 ** (-torch.arange(0, hd, 2).float() / hd)
    angle = torch.arange(t).float()[:, None] * theta[None]  # [t, hd/2]
    x0, x1 = p[..., 0::2], p[..., 1::2]
    rotated = torch.stack([x0 * angle.cos() - x1 * angle.sin(), x0 * angle.sin() + x1 * angle.cos()], dim=-1)
    expected = rope_permute(ours[0].permute(0, 2, 1).reshape(heads * hd, t), heads).reshape(heads, hd, t)
    assert torch.allclose(rotated.reshape(heads, t, hd), expected.permute(0, 2, 1), atol=1e-5)
    assert torch.equal(rope_unpermute(rope_permute(w, heads), heads), w)


def test_export_refuses_a_tokenizer_whose_cjk_runs_llama_cpp_would_not_cut(tmp_path, tokenizer_dir):
    # the default tokenizer cuts CJK runs every 16 characters and merges within them; llama.cpp never cuts them
    run = make_run_dir(tmp_path, make_model(1200), tokenizer_dir)
    with pytest.raises(XiaolmError, match="cjk_chars=true or max_cjk_run=0"):
        export_gguf(run, tmp_path / "m.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*"))


def test_cli_exports_gguf_and_refuses_a_dtype_of_the_other_format(tmp_path, chars_tokenizer_dir, capsys):
    from tests.test_cli import ok

    run = make_run_dir(tmp_path, make_model(320), chars_tokenizer_dir)
    ok(["export", str(run), "--out", str(tmp_path / "g"), "--format", "gguf", "--dtype", "q8_0"])
    assert (tmp_path / "g" / "model.gguf").is_file()
    assert "bf16 is for --format hf" in error_line(
        ["export", str(run), "--out", str(tmp_path / "x"), "--format", "gguf", "--dtype", "bf16"], capsys)
    assert "q8_0 is for --format gguf" in error_line(
        ["export", str(run), "--out", str(tmp_path / "x"), "--dtype", "q8_0"], capsys)
