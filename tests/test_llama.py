"""The Llama model: HF parity (logits, loss, names), KV cache, padded batches, config checks, init, FLOPs."""

import math
from dataclasses import replace

import pytest
import torch

from xiaolm.errors import XiaolmError
from xiaolm.model.llama import Llama, LlamaConfig, document_mask, flops_per_token


def tiny(**kw) -> LlamaConfig:
    base = dict(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=48)
    base.update(kw)
    return LlamaConfig(**base)


def hf_twin(model: Llama):
    """transformers' LlamaForCausalLM built from our hf_config(), loaded strictly with our state dict."""
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM(HFConfig(**model.hf_config())).eval()
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf


def large_init(model: Llama) -> Llama:
    """Embeddings N(0,1), matrices N(0, 2/sqrt(fan_in)): attention far from uniform, so positions matter."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 if "embed" in name or "lm_head" in name else 2 / p.shape[1] ** 0.5)
    return model.eval()


@pytest.mark.parametrize("tie,n_kv_heads", [(True, 2), (False, 2), (True, 4), (False, 1)])
def test_logits_and_loss_match_transformers(tie, n_kv_heads):
    torch.manual_seed(0)
    model = large_init(Llama(tiny(tie_embeddings=tie, n_kv_heads=n_kv_heads)))
    hf = hf_twin(model)
    x = torch.randint(0, 96, (3, 40))
    with torch.no_grad():
        ours, _ = model(x)
        hf.set_attn_implementation("eager")  # the only one that returns attention weights
        out = hf(x, output_attentions=True)
        # a near-uniform attention would let a wrong rotary (positions, halves, frequencies) pass unseen
        peak = torch.stack([a.max(-1).values[..., 8:].mean() for a in out.attentions])
        assert peak.min().item() > 0.5
        torch.testing.assert_close(ours, out.logits, rtol=0, atol=1e-4 * out.logits.abs().max().item())
        # HF shifts labels inside: labels == input_ids; ours takes targets already shifted, last one unknown
        labels = x.clone()
        labels[0, :7] = -100  # masked prompt tokens
        targets = torch.cat([labels[:, 1:], torch.full((3, 1), -100)], dim=1)
        _, loss = model(x, targets)
        assert loss.item() == pytest.approx(hf(x, labels=labels).loss.item(), rel=1e-5)


def test_parameter_names_are_hf_names():
    model = Llama(tiny(n_layers=1, tie_embeddings=False))
    assert set(model.state_dict()) == {
        "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
        "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
        *(f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkvo"),
        *(f"model.layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
    }
    assert not any("bias" in name for name in model.state_dict())


def test_tied_embeddings_share_one_tensor_and_count_once():
    tied, untied = Llama(tiny()), Llama(tiny(tie_embeddings=False))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert untied.num_params() - tied.num_params() == 96 * 64
    assert tied.num_params(exclude_embeddings=True) == tied.num_params() - 96 * 64
    assert tied.num_params() == hf_twin(tied).num_parameters()


def test_kv_cache_decoding_matches_full_forward():
    torch.manual_seed(1)
    model = Llama(tiny()).eval()
    x = torch.randint(0, 96, (2, 30))
    with torch.no_grad():
        full, _ = model(x)
        cache = model.new_kv_cache(2, 30)
        steps = [model(x[:, :6], kv_cache=cache)[0]]  # prefill
        steps.append(model(x[:, 6:11], kv_cache=cache)[0])  # a chunk after cached tokens
        steps += [model(x[:, t:t + 1], kv_cache=cache)[0] for t in range(11, 30)]  # one token at a time
    assert cache.length == 30
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 2), (4, 1), (4, 4)])
def test_decoding_rows_at_different_lengths_matches_full_forward(n_heads, n_kv_heads):
    # one token per row, rows 6 and 4 positions in: each row's keys are masked to its own length
    torch.manual_seed(2)
    model = large_init(Llama(tiny(n_heads=n_heads, n_kv_heads=n_kv_heads)))
    x = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        cache = model.new_kv_cache(2, 16)
        model(x[:, :6], kv_cache=cache)
        cache.lengths[1] = 4  # row 1 holds 4 tokens: its next one goes to position 4
        step = torch.stack([x[0, 6], x[1, 4]])[:, None]
        got = model(step, kv_cache=cache.view(slice(0, 2), 6, ragged=True))[0][:, 0]
        want = torch.stack([model(x[:1, :7])[0][0, -1], model(x[1:, :5])[0][0, -1]])
    assert (got - want).abs().max().item() < 1e-4

def test_kv_cache_refuses_overflow():
    model = Llama(tiny())
    cache = model.new_kv_cache(1, 8)
    with torch.no_grad():
        model(torch.zeros(1, 8, dtype=torch.long), kv_cache=cache)
        with pytest.raises(XiaolmError, match="KV cache"):
            model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)
        with pytest.raises(XiaolmError, match="max_seq_len"):
            model(torch.zeros(1, 49, dtype=torch.long))


def test_left_padded_batch_with_mask_and_positions_matches_unpadded():
    torch.manual_seed(2)
    model = Llama(tiny()).eval()
    a, b = torch.randint(1, 96, (10,)), torch.randint(1, 96, (6,))
    ids = torch.stack([a, torch.cat([torch.zeros(4, dtype=torch.long), b])])
    valid = torch.tensor([[True] * 10, [False] * 4 + [True] * 6])
    mask = torch.ones(10, 10, dtype=torch.bool).tril() & valid[:, None, :] | torch.eye(10, dtype=torch.bool)
    pos = (torch.arange(10)[None] - torch.tensor([[0], [4]])).clamp(min=0)
    with torch.no_grad():
        batched, _ = model(ids, attn_mask=mask[:, None], position_ids=pos)
        assert (batched[0] - model(a[None])[0][0]).abs().max() < 1e-5
        assert (batched[1, 4:] - model(b[None])[0][0]).abs().max() < 1e-5


def test_loss_ignores_minus_100_and_is_float32():
    torch.manual_seed(3)
    model = Llama(tiny())
    x = torch.randint(0, 96, (2, 12))
    y = torch.randint(0, 96, (2, 12))
    y[:, :5] = -100
    logits, loss = model(x)[0], model(x, y)[1]
    manual = torch.nn.functional.cross_entropy(logits[:, 5:].reshape(-1, 96), y[:, 5:].reshape(-1))
    assert loss.dtype == torch.float32 and abs(loss.item() - manual.item()) < 1e-6
    assert abs(loss.item() - math.log(96)) < 0.2  # small init: near-uniform predictions
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x, y)[1].dtype == torch.float32


def test_a_few_adamw_steps_reduce_the_loss():
    torch.manual_seed(4)
    model = Llama(tiny())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 96, (4, 33))
    first = None
    for _ in range(15):
        _, loss = model(x[:, :-1], x[:, 1:])
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 1.0


def test_init_scales_residual_projections():
    torch.manual_seed(5)
    model = Llama(LlamaConfig(vocab_size=512, dim=256, n_layers=8, n_heads=4, n_kv_heads=2))
    std = lambda name: dict(model.named_parameters())[name].std().item()  # noqa: E731
    assert abs(std("model.layers.0.self_attn.q_proj.weight") - 0.02) < 0.002
    assert abs(std("model.embed_tokens.weight") - 0.02) < 0.002
    for name in ("model.layers.3.self_attn.o_proj.weight", "model.layers.3.mlp.down_proj.weight"):
        assert abs(std(name) - 0.02 / math.sqrt(16)) < 0.0005
    assert (dict(model.named_parameters())["model.norm.weight"] == 1).all()


def test_default_ffn_width_is_a_multiple_of_64_at_least_8_thirds_dim():
    for dim in (64, 128, 256, 320, 512):
        hidden = LlamaConfig(dim=dim).hidden_dim
        assert hidden % 64 == 0 and 8 * dim / 3 <= hidden < 8 * dim / 3 + 64
    assert LlamaConfig(dim=256).hidden_dim == 704
    assert LlamaConfig(ffn_dim=100).hidden_dim == 100


@pytest.mark.parametrize("kw,fields", [
    (dict(dim=100, n_heads=3), ["model.dim", "model.n_heads"]),
    (dict(n_heads=4, n_kv_heads=3), ["model.n_heads", "model.n_kv_heads"]),
    (dict(dim=36, n_heads=4, n_kv_heads=4), ["model.dim", "model.n_heads"]),  # head dim 9 is odd
    (dict(n_kv_heads=0), ["model.n_kv_heads"]),
    (dict(vocab_size=64, eos_token_id=70), ["model.eos_token_id", "model.vocab_size"]),
])
def test_check_names_clashing_fields(kw, fields):
    with pytest.raises(XiaolmError) as err:
        Llama(LlamaConfig(**kw))
    assert all(f in str(err.value) for f in fields)


def test_hf_config_round_trip_and_transformers_accepts_it():
    from transformers import LlamaConfig as HFConfig

    cfg = tiny(tie_embeddings=False, rope_theta=5e5, norm_eps=1e-6, bos_token_id=1)
    d = cfg.hf_config("bfloat16")
    assert d["architectures"] == ["LlamaForCausalLM"] and d["torch_dtype"] == "bfloat16"
    assert LlamaConfig.from_hf_config(d) == replace(cfg, ffn_dim=cfg.hidden_dim)
    hf = HFConfig(**d)
    assert (hf.hidden_size, hf.intermediate_size, hf.num_key_value_heads) == (64, cfg.hidden_dim, 2)
    assert hf.rope_parameters["rope_theta"] == 5e5 and hf.tie_word_embeddings is False


@pytest.mark.parametrize("change,match", [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "not a Llama"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "yarn"),
    ({"hidden_size": None}, "hidden_size"),
])
def test_from_hf_config_refuses_what_it_cannot_compute(change, match):
    with pytest.raises(XiaolmError, match=match):
        LlamaConfig.from_hf_config({**tiny().hf_config(), **change})


def test_flops_per_token():
    cfg = LlamaConfig(vocab_size=8192, dim=256, n_layers=4, n_heads=4, n_kv_heads=2)
    model = Llama(cfg)
    # matmul weights: everything but the norms; the tied embedding counts once, as the output head
    n = model.num_params() - sum(p.numel() for name, p in model.named_parameters() if "norm" in name)
    assert flops_per_token(cfg, 256) == 6 * n + 12 * 4 * 256 * 256


def test_documents_packed_in_a_row_do_not_see_each_other():
    torch.manual_seed(6)
    model = Llama(tiny())
    first, second = torch.randint(1, 96, (7,)), torch.randint(1, 96, (9,))
    row = torch.cat([first, second])[None]
    doc_ids = torch.tensor([[0] * 7 + [1] * 9])
    _, positions = document_mask(doc_ids)
    assert positions.tolist() == [list(range(7)) + list(range(9))]
    y = torch.randint(0, 96, (1, 16))
    packed = model(row, y, doc_ids=doc_ids)[1]
    alone = (model(first[None], y[:, :7])[1] * 7 + model(second[None], y[:, 7:])[1] * 9) / 16
    assert abs(packed.item() - alone.item()) < 1e-5
    other_first = torch.cat([torch.randint(1, 96, (7,)), second])[None]
    with torch.no_grad():
        hidden = [model.model.norm(model.model.embed_tokens(r)) for r in (row, other_first)]
    assert not torch.equal(hidden[0], hidden[1])  # the rows really differ in the first document
    y2 = y.clone()
    y2[:, :7] = -100  # loss on the second document only: unaffected by what the first one says
    assert abs(model(row, y2, doc_ids=doc_ids)[1].item() - model(other_first, y2, doc_ids=doc_ids)[1].item()) < 1e-5
    assert abs(model(row, y2)[1].item() - model(other_first, y2)[1].item()) > 1e-4  # without doc_ids it is
