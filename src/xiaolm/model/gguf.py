"""GGUF export for llama.cpp and Ollama: Llama weights in llama.cpp's layout plus the byte-level BPE tokenizer.

llama.cpp does not read a tokenizer's pre-tokenizer from the file: it picks one of its own regexes by the name in
`tokenizer.ggml.pre`. We write "ufakzeka" (Qwen2's pattern without the English contractions), and before writing
we check that it gives this tokenizer's token ids on a probe text: see check_pre_tokenizer.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from xiaolm.chat_format import EOS, IM_END
from xiaolm.errors import XiaolmError
from xiaolm.io import atomic_write_text
from xiaolm.model.export import load_model, resolve_model_dir

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from torch import nn

log = logging.getLogger(__name__)

GGUF_FILE = "model.gguf"
# Ollama reads the template from here, not from the GGUF's chat_template (Go templates, not Jinja)
MODELFILE = '''FROM ./model.gguf
TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
PARAMETER stop "<|im_end|>"
PARAMETER stop "<|endoftext|>"
PARAMETER temperature 0.7
PARAMETER top_p 0.9
PARAMETER repeat_penalty 1.1
'''
# "fp16"/"fp32" as `xiaolm export --format hf` spells them are accepted too
GGUF_DTYPES = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0", "fp32": "F32", "fp16": "F16"}
LLAMA_CPP_PRE = "ufakzeka"
# llama.cpp's regex for LLAMA_CPP_PRE (src/llama-vocab.cpp), as tokenizers spells it. Our pre-tokenizer cuts text
# at least as finely: it isolates digits as this does, and cuts CJK, Latin letters, punctuation and whitespace
# apart where this joins a letter run to one leading non-letter (space, punctuation, another script's letters).
# BPE never merges across a cut it was trained with, so the joined runs still give our ids, as long as the
# tokenizer itself does not cut where this regex does not (a CJK run cut every max_cjk_run characters does).
LLAMA_CPP_REGEX = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
PROBE_TEXTS = (
    "你好，世界！Hello, world 2026年12月4日。我用python写了3个函数，每个100行。",
    "He said 'sorry' and 'then' left; it's John's book, I'd've gone. ‘引号’ “quoted”",
    "中华人民共和国成立于一九四九年十月一日北京天安门广场上举行了隆重的开国大典仪式没有标点的长句子",
    "  缩进\n\tdef f(x):\n        return x + 1\n\n\n结束。\r\n价格：¥1,234.56元（约$170）——很便宜！！！……",
    "日本語のテキスト、한국어 텍스트。emoji 😀👍🏻 👨‍👩‍👧 ©®™ ±≤≥ → ★ café naïve e\u0301 ① Ⅻ ½",
    " 空格开头 和 空格 结尾 ",
)
# HF name (layer number as {}) → llama.cpp name
TENSOR_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{}.input_layernorm.weight": "blk.{}.attn_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "blk.{}.attn_q.weight",
    "model.layers.{}.self_attn.k_proj.weight": "blk.{}.attn_k.weight",
    "model.layers.{}.self_attn.v_proj.weight": "blk.{}.attn_v.weight",
    "model.layers.{}.self_attn.o_proj.weight": "blk.{}.attn_output.weight",
    "model.layers.{}.post_attention_layernorm.weight": "blk.{}.ffn_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "blk.{}.ffn_gate.weight",
    "model.layers.{}.mlp.up_proj.weight": "blk.{}.ffn_up.weight",
    "model.layers.{}.mlp.down_proj.weight": "blk.{}.ffn_down.weight",
}


def rope_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k rows from HF's rotary layout (dim i pairs with i + d/2 in a head) to llama.cpp's (2i with 2i + 1)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def rope_unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of rope_permute."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def llama_cpp_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(llama.cpp name, float32 tensor) for each weight; q/k permuted; a tied output head left out (llama.cpp
    reuses token_embd when output.weight is missing)."""
    cfg = model.cfg
    names = {}
    for hf, gg in TENSOR_NAMES.items():
        for i in range(cfg.n_layers) if "{}" in hf else [None]:
            names[hf.format(i)] = gg.format(i)
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_embeddings:
            continue
        if key not in names:
            raise XiaolmError(f"no GGUF name for the weight {key}", hint="GGUF export supports Llama models only")
        w = value.detach().to("cpu", torch.float32)
        if key.endswith("q_proj.weight"):
            w = rope_permute(w, cfg.n_heads)
        elif key.endswith("k_proj.weight"):
            w = rope_permute(w, cfg.n_kv_heads)
        yield names[key], w


def read_tokenizer(tok_dir: Path) -> dict[str, Any]:
    """tokenizer.json and tokenizer_config.json as plain JSON (the model layer does not load tokenizer code)."""
    try:
        tok = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
        conf_path = tok_dir / "tokenizer_config.json"
        conf = json.loads(conf_path.read_text(encoding="utf-8")) if conf_path.is_file() else {}
    except (OSError, ValueError) as e:
        raise XiaolmError(f"tokenizer files are unreadable: {e}", where=str(tok_dir)) from None
    model = tok.get("model", {})
    if model.get("type") != "BPE" or (tok.get("decoder") or {}).get("type") != "ByteLevel":
        raise XiaolmError("GGUF export needs a byte-level BPE tokenizer", where=str(tok_dir / "tokenizer.json"),
                          hint="sentencepiece tokenizers are not supported; train with --backend bpe")
    if tok.get("normalizer"):  # llama.cpp's BPE has none: it would see other text than ours
        raise XiaolmError("GGUF export needs a tokenizer without a normalizer", where=str(tok_dir / "tokenizer.json"))
    template = conf.get("chat_template")
    if template is None and (tok_dir / "chat_template.jinja").is_file():
        template = (tok_dir / "chat_template.jinja").read_text(encoding="utf-8")
    return {"json": tok, "config": conf, "chat_template": template}


def gguf_vocab(tok: dict[str, Any], vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, token types, merges as "a b") for `vocab_size` ids; special tokens are CONTROL."""
    from gguf import TokenType

    vocab = dict(tok["json"]["model"]["vocab"])
    special = {t["content"] for t in tok["json"].get("added_tokens", []) if t.get("special")}
    for t in tok["json"].get("added_tokens", []):
        vocab[t["content"]] = t["id"]
    if max(vocab.values()) >= vocab_size:
        raise XiaolmError(f"the tokenizer has ids up to {max(vocab.values())}, the model only {vocab_size}",
                          hint="the tokenizer does not belong to this model")
    tokens = [f"<|unused_{i}|>" for i in range(vocab_size)]  # ids the tokenizer never produces (padded vocab)
    types = [int(TokenType.UNUSED)] * vocab_size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = int(TokenType.CONTROL if text in special else TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["json"]["model"].get("merges", [])]
    return tokens, types, merges


def probe_texts(tok_json: dict[str, Any]) -> list[str]:
    """PROBE_TEXTS plus the vocabulary's own whole-character tokens run together (long CJK runs, digits, code)."""
    from tokenizers import decoders

    byte_level = decoders.ByteLevel()
    words = [byte_level.decode([t]) for t in tok_json["model"]["vocab"]]
    words = [w for w in words if "\ufffd" not in w]
    cjk = [w for w in words if len(w) > 1 and all("\u4e00" <= c <= "\u9fff" for c in w)]
    return [*PROBE_TEXTS, "".join(words), "".join(cjk), " ".join(words)]


def as_llama_cpp_splits(tok_json: dict[str, Any]) -> Tokenizer:
    """This tokenizer's BPE model behind llama.cpp's LLAMA_CPP_PRE regex instead of its own pre-tokenizer."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers

    tok = Tokenizer.from_str(json.dumps(tok_json))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA_CPP_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    return tok


def check_pre_tokenizer(tok_json: dict[str, Any], where: str = "tokenizer.json") -> None:
    """XiaolmError unless llama.cpp's LLAMA_CPP_PRE splitting yields this tokenizer's ids on the probe texts.

    The comparison runs as_llama_cpp_splits with `tokenizers`; tests/test_gguf_llama_cpp.py checks that llama.cpp
    itself gives the same ids, where they equal ours and where they do not.
    """
    from tokenizers import Tokenizer

    ours, theirs = Tokenizer.from_str(json.dumps(tok_json)), as_llama_cpp_splits(tok_json)
    for text in probe_texts(tok_json):
        a, b = ours.encode(text, add_special_tokens=False), theirs.encode(text, add_special_tokens=False)
        if a.ids != b.ids:
            i = next(k for k, (x, y) in enumerate(zip(a.ids + [-1], b.ids + [-2], strict=False)) if x != y)
            start = a.offsets[max(0, i - 2)][0] if i < len(a.offsets) else 0
            raise XiaolmError(
                f"llama.cpp's '{LLAMA_CPP_PRE}' pre-tokenizer would cut {text[start:start + 24]!r} into other tokens "
                "than this tokenizer (no pre-tokenizer llama.cpp knows matches its rules)", where=where,
                hint="GGUF export needs a tokenizer trained with cjk_chars=true or max_cjk_run=0 (and digits=1, "
                     "newline_indent=false); export --format hf instead")


def export_gguf(source: str | Path, out: str | Path, dtype: str = "f16") -> Path:
    """Write a GGUF file for llama.cpp, tokenizer included: `out` if it ends in .gguf, else out/model.gguf with an
    Ollama Modelfile beside it."""
    import gguf

    if dtype not in GGUF_DTYPES:
        raise XiaolmError(f"unknown GGUF dtype {dtype!r}", hint="choose f16, f32 or q8_0 (bf16 is for --format hf)")
    qtype = gguf.GGMLQuantizationType[GGUF_DTYPES[dtype]]
    _, tok_dir = resolve_model_dir(source)
    if tok_dir is None:
        raise XiaolmError("no tokenizer next to the model; a GGUF file needs one", where=str(source),
                          hint="export from the training run dir, or copy the tokenizer files into the model dir")
    tok = read_tokenizer(tok_dir)
    check_pre_tokenizer(tok["json"], where=str(tok_dir / "tokenizer.json"))
    model, _ = load_model(source, with_tokenizer=False)
    cfg = model.cfg
    if cfg.arch != "llama":
        raise XiaolmError(f"GGUF export supports Llama models, not {cfg.arch!r}", where=str(source))
    out = Path(out)
    path = out if out.suffix == ".gguf" else out / GGUF_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, arch="llama")
    try:
        _write_metadata(writer, cfg, tok, qtype, Path(source).resolve().name)
        for name, w in llama_cpp_tensors(model):
            data, kind = _encode(w, qtype)
            writer.add_tensor(name, data, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if path.name == GGUF_FILE and path.parent == out:
        atomic_write_text(out / "Modelfile", MODELFILE + f"PARAMETER num_ctx {cfg.max_seq_len}\n")  # Ollama's is larger
    log.info("export: wrote %s (%s, %.1f MB)", path, dtype, path.stat().st_size / 1e6)
    return path


def _encode(w: torch.Tensor, qtype: Any) -> tuple[np.ndarray, Any]:
    """(array, GGML type) for one tensor: norms stay F32; q8_0 needs rows that are a multiple of 32, else F16."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    a = w.numpy()
    if a.ndim == 1 or qtype == Q.F32:
        return a, Q.F32
    if qtype == Q.Q8_0 and a.shape[-1] % 32 == 0:
        return quants.quantize(a, Q.Q8_0), Q.Q8_0
    return a.astype(np.float16), Q.F16


def _write_metadata(writer: Any, cfg: Any, tok: dict[str, Any], qtype: Any, name: str) -> None:
    import gguf

    file_types = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                  "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_name(name)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.hidden_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(file_types[qtype.name])

    tokens, types, merges = gguf_vocab(tok, cfg.vocab_size)
    ids = {t: i for i, t in enumerate(tokens)}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(LLAMA_CPP_PRE)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    eos = ids.get(tok["config"].get("eos_token") or EOS, cfg.eos_token_id)
    pad = ids.get(tok["config"].get("pad_token") or EOS, cfg.pad_token_id)
    # our models have no BOS; llama.cpp wants an id anyway (else GPT-2's 11), so <|endoftext|>, never added
    writer.add_bos_token_id(cfg.bos_token_id if cfg.bos_token_id is not None else eos)
    writer.add_add_bos_token(False)
    writer.add_eos_token_id(eos)
    writer.add_pad_token_id(pad)
    if IM_END in ids:  # end of an assistant turn: llama.cpp stops there in chat
        writer.add_eot_token_id(ids[IM_END])
    if tok["chat_template"]:
        writer.add_chat_template(tok["chat_template"])
