"""The T5 text-to-text model: HF parity of losses, log-probs and greedy output, the cached decoder under continuous
batching, export and loading, freezing and LoRA targets."""

import json

import pytest
import torch

from xiaolm.errors import XiaolmError
from xiaolm.infer.generate import Engine, GenerationConfig, generate, generate_batch
from xiaolm.model.export import load_model, save_model_weights
from xiaolm.model.t5 import T5, T5Config

IGNORE = -100


def tiny(decoder_layers=None, seed=0, **kw) -> T5:
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=300, dim=32, n_layers=2, n_decoder_layers=decoder_layers, n_heads=4, head_dim=8,
                   ffn_dim=64, max_seq_len=64, eos_token_id=1, pad_token_id=0, **kw)
    model = T5(cfg).eval()
    with torch.no_grad():  # random weights large enough that greedy replies vary token to token
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def rows(spans, width=20, seed=1):
    """Decoder-only rows: a prompt, then the answer at y[k..e], then padding."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(2, 300, (len(spans), width), generator=g)
    y = torch.full((len(spans), width), IGNORE)
    for b, (k, e) in enumerate(spans):
        y[b, k:e + 1] = torch.randint(2, 300, (e - k + 1,), generator=g)
        x[b, k + 1:e + 1] = y[b, k:e]
    return x, y


def save(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("t5")
    save_model_weights(model, out)
    return model, out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return save(tiny(), tmp_path_factory)


def test_log_probs_and_loss_equal_hf_on_each_rows_source_and_target(tmp_path_factory):
    from transformers import T5ForConditionalGeneration

    model, out = save(tiny(decoder_layers=3), tmp_path_factory)  # decoder deeper than the encoder
    hf = T5ForConditionalGeneration.from_pretrained(out).eval()
    spans = [(5, 12), (9, 19), (0, 7)]
    x, y = rows(spans)
    logps = model(x, y, output="logprobs")
    total, count = 0.0, 0
    for b, (k, e) in enumerate(spans):
        target = y[b:b + 1, k:e + 1]
        ref = torch.log_softmax(hf(input_ids=x[b:b + 1, :k + 1], labels=target).logits, -1)
        ref = ref.gather(-1, target[..., None])[..., 0]
        torch.testing.assert_close(logps[b:b + 1, k:e + 1], ref, atol=1e-5, rtol=1e-5)
        assert logps[b, :k].abs().sum() == 0 and logps[b, e + 1:].abs().sum() == 0  # only y's answer positions
        total, count = total - ref.sum().item(), count + target.numel()
    assert model(x, y)[1].item() == pytest.approx(total / count, rel=1e-5)


def test_multi_turn_row_trains_on_its_last_answer_with_the_history_as_source():
    model = tiny()
    x, y = rows([(10, 15)])
    y[0, 3:6] = x[0, 4:7]  # an earlier assistant turn: labelled, but context for a text-to-text model
    parts = model.split(x, y)
    assert parts["src"].shape[1] == 11 and torch.equal(parts["src"][0], x[0, :11])
    assert torch.equal(parts["tgt"][0], y[0, 10:16])


def test_greedy_output_equals_hf_generate(exported):
    from transformers import T5ForConditionalGeneration

    model, out = exported
    hf = T5ForConditionalGeneration.from_pretrained(out).eval()
    cfg = GenerationConfig(max_new_tokens=12, temperature=0)
    prompts = [[5, 17, 40, 90, 3, 8], list(range(20, 30)), [7, 9, 11]]
    ours = generate_batch(model, prompts, cfg)
    assert len({tuple(o) for o in ours}) == 3 and max(len(set(o)) for o in ours) > 3
    for prompt, reply in zip(prompts, ours, strict=True):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None
                          )[0, 1:].tolist()
        assert reply == ref
        assert generate(model, prompt, cfg) == reply


def test_requests_joining_a_running_batch_decode_as_they_would_alone():
    model = tiny()
    cfg = GenerationConfig(max_new_tokens=10, temperature=0)
    prompts = [[5, 17, 40, 90, 3, 8], list(range(20, 40)), [7, 9, 11]]
    alone = [generate(model, p, cfg) for p in prompts]
    engine = Engine(model, slots=3, max_len=16)
    got: dict[int, list[int]] = {}
    slot_of = {}
    for i, prompt in enumerate(prompts):  # each joins two steps after the previous one: rows at different lengths
        slot_of[engine.add([prompt], [cfg])[0]] = i
        for _ in range(2):
            for event in engine.step():
                if event.token is not None:
                    got.setdefault(slot_of[event.slot], []).append(event.token)
    while engine.rows:
        for event in engine.step():
            if event.token is not None:
                got.setdefault(slot_of[event.slot], []).append(event.token)
    assert [got[i] for i in range(3)] == alone


def test_export_loads_in_transformers_auto_classes(exported):
    from transformers import AutoModelForSeq2SeqLM

    model, out = exported
    hf = AutoModelForSeq2SeqLM.from_pretrained(out)
    assert type(hf).__name__ == "T5ForConditionalGeneration"
    assert hf.config.decoder_start_token_id == model.cfg.pad_token_id
    again, _ = load_model(out, with_tokenizer=False)
    assert again.cfg == model.cfg
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_gated_t5_config_is_refused_by_name():
    cfg = tiny().cfg.hf_config()
    with pytest.raises(XiaolmError, match="feed_forward_proj='gated-gelu'"):
        T5Config.from_hf_config({**cfg, "feed_forward_proj": "gated-gelu"})


def test_calls_without_targets_are_refused():
    model = tiny()
    x, _ = rows([(3, 8)])
    with pytest.raises(XiaolmError, match="needs the targets"):
        model(x, output="hidden")


def test_freeze_encoder_and_decoder_layer_ranges():
    from xiaolm.model.adapters import freeze
    from xiaolm.model.registry import get_arch

    model = tiny(decoder_layers=3)
    groups = get_arch("t5").freeze_groups(model.cfg)
    frozen = freeze(model, ["encoder", "decoder.layers.0-1"], groups)
    assert all(n.startswith(("encoder.", "decoder.block.0.", "decoder.block.1.")) for n in frozen)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("encoder."))
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("decoder.block.2."))
    with pytest.raises(XiaolmError, match=r"decoder.layers 0 … 2"):
        freeze(model, ["decoder.layers.5"], groups)


def test_lora_on_the_default_targets_trains_adapters_only():
    from xiaolm.model.adapters import LoraSettings, apply_lora
    from xiaolm.model.registry import get_arch

    peft_model = apply_lora(tiny(), LoraSettings(r=4, alpha=8), get_arch("t5").lora_targets)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any(".wi." in n for n in trainable) and any("EncDecAttention.q" in n for n in trainable)


def test_multiple_choice_scores_each_option_as_the_target_of_its_prompt():
    from xiaolm.eval.choice import score_options

    model = tiny()
    encoded = [([5, 17, 40], [[8, 9], [10, 11, 12]], [20, 21]), ([7, 9, 11, 13, 15], [[30], [31, 32]], [22, 23])]
    scored = score_options(model, encoded)
    for (prompt, options, letters), (sums, letter_logps) in zip(encoded, scored, strict=True):
        for option, total in zip(options, sums, strict=True):  # one row, the option as the whole target
            x = torch.tensor([prompt + option[:-1]])
            y = torch.tensor([[IGNORE] * (len(prompt) - 1) + option])
            assert total == pytest.approx(model(x, y, output="logprobs").sum().item(), abs=1e-4)
        for letter, logp in zip(letters, letter_logps, strict=True):
            y = torch.tensor([[IGNORE] * (len(prompt) - 1) + [letter]])
            assert logp == pytest.approx(model(torch.tensor([prompt]), y, output="logprobs").sum().item(), abs=1e-4)


def test_the_server_answers_chat_completions_with_a_t5_model(tiny_tokenizer_dir):
    from fastapi.testclient import TestClient

    from xiaolm.infer.server import create_app
    from xiaolm.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    model = tiny()
    model.cfg.pad_token_id = model.cfg.eos_token_id = tok.pad_token_id
    body = {"model": "t5", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 64, "temperature": 0}
    with TestClient(create_app(model, tok, "t5")) as client:
        reply = client.post("/v1/chat/completions", json=body)
        streamed = client.post("/v1/chat/completions", json={**body, "stream": True})
    assert reply.status_code == 200, reply.text
    out = reply.json()
    assert "capped to 63" in out["warnings"][0]  # the reply has the decoder's context, whatever the prompt
    from xiaolm.infer.generate import GenerationConfig, chat_reply

    expected = "".join(chat_reply(model, tok, body["messages"], GenerationConfig(max_new_tokens=63, temperature=0)))
    assert expected and out["choices"][0]["message"]["content"] == expected
    deltas = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert "".join(d["choices"][0]["delta"].get("content") or "" for d in deltas if d["choices"]) == expected
    assert streamed.text.rstrip().endswith("data: [DONE]")


def test_packed_chats_get_the_log_probs_each_gets_alone():
    import numpy as np

    from xiaolm.tokenizer.chat import collate, collate_packed

    model = tiny()
    g = torch.Generator().manual_seed(3)
    chats = []
    for n_prompt, n_answer in [(5, 4), (8, 2), (3, 6), (6, 5)]:
        ids = torch.randint(2, 300, (n_prompt + n_answer,), generator=g).numpy().astype(np.int32)
        labels = np.concatenate([np.full(n_prompt, IGNORE), ids[n_prompt:]]).astype(np.int32)
        chats.append((ids, labels))
    packed = collate_packed([chats[:3], chats[3:]], pad_id=0)
    logps = model(packed["x"], packed["y"], output="logprobs", doc_ids=packed["doc"])
    alone = [model(b["x"], b["y"], output="logprobs")[0] for b in (collate([c], 0) for c in chats)]
    row0 = torch.cat([a for a in alone[:3]])
    torch.testing.assert_close(logps[0, :len(row0)], row0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logps[1, :len(alone[3])], alone[3], atol=1e-5, rtol=1e-5)
    assert logps[0].abs().sum() > 0 and (logps[0][packed["y"][0] == IGNORE] == 0).all()
    mean = -torch.cat([a[a != 0] for a in alone]).mean()
    assert model(packed["x"], packed["y"], doc_ids=packed["doc"])[1].item() == pytest.approx(mean.item(), rel=1e-5)
