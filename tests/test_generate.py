"""Generation (greedy, sampling filters, repetition penalty, stops, batching), streamed text, chat CLI."""

import io
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from xiaolm.infer.chat import run_chat, trim_history
from xiaolm.infer.generate import (
    GenerationConfig,
    apply_repetition_penalty,
    chat_reply,
    filter_logits,
    generate,
    generate_batch,
    generate_stream,
    stream_text,
)
from xiaolm.model.export import save_model_weights
from xiaolm.model.llama import Llama, LlamaConfig

GREEDY = GenerationConfig(temperature=0.0, max_new_tokens=16)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from xiaolm.tokenizer import load_tokenizer

    return load_tokenizer(tiny_tokenizer_dir)


def random_model(vocab: int = 300, max_seq_len: int = 64, seed: int = 0) -> Llama:
    """Random weights at a large scale, so greedy choices are far from ties and outputs vary."""
    torch.manual_seed(seed)
    model = Llama(LlamaConfig(vocab_size=vocab, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                              max_seq_len=max_seq_len))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 if "embed" in name else 2 / p.shape[1] ** 0.5)
    return model.eval()


def constant_model(scores: dict[int, float], vocab: int = 300) -> Llama:
    """A model whose next-token logits are `scores` (0 elsewhere) whatever the context."""
    model = Llama(LlamaConfig(vocab_size=vocab, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=64,
                              tie_embeddings=False))
    logits = torch.zeros(vocab)
    for token, value in scores.items():
        logits[token] = value
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()  # blocks add nothing: the final hidden state is norm(embedding) = all ones
        model.model.embed_tokens.weight.fill_(1.0)
        model.lm_head.weight.copy_(logits[:, None].expand(vocab, 16) / 16)
    return model.eval()


def test_greedy_with_cache_matches_argmax_of_full_forward():
    model = random_model()
    prompt = [5, 17, 42, 99, 3]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(16):
            ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    assert generate(model, prompt, GREEDY) == ids[len(prompt):]


def test_top_k_1_and_tiny_top_p_are_greedy_and_seeds_reproduce():
    model = random_model()
    prompt = [7, 8, 9]
    greedy = generate(model, prompt, GREEDY)
    assert len(set(greedy)) > 4
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        sampled = GenerationConfig(temperature=1.0, max_new_tokens=16, seed=1, **kw)
        assert generate(model, prompt, sampled) == greedy
    hot = GenerationConfig(temperature=3.0, max_new_tokens=16, seed=123)
    assert generate(model, prompt, hot) == generate(model, prompt, hot)
    others = {tuple(generate(model, prompt, GenerationConfig(temperature=3.0, max_new_tokens=16, seed=s)))
              for s in range(4)}
    assert len(others) > 1


def test_filters_and_penalty_match_transformers():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    for p in (0.1, 0.5, 0.9, 0.99):
        assert torch.equal(filter_logits(logits, top_p=p).isinf(), TopPLogitsWarper(p)(None, logits).isinf())
    for k in (1, 5, 49):
        assert torch.equal(filter_logits(logits, top_k=k).isinf(), TopKLogitsWarper(k)(None, logits).isinf())
    ids = torch.randint(0, 50, (4, 12))
    seen = torch.zeros(4, 50, dtype=torch.bool).scatter(1, ids, True)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    assert torch.allclose(apply_repetition_penalty(logits, seen, 1.3), expected)
    assert torch.allclose(apply_repetition_penalty(logits, ids, 1.3), expected)  # ids work too


def test_repetition_penalty_changes_a_crafted_case():
    model = constant_model({5: 8.0, 7: 6.0})
    assert generate(model, [1], GREEDY)[:6] == [5] * 6
    # 5 once seen scores 8/2 = 4 < 6, so 7 comes next; then both seen: 4 > 3, so 5 again
    penal = GenerationConfig(temperature=0.0, max_new_tokens=6, repetition_penalty=2.0)
    assert generate(model, [1], penal) == [5, 7, 5, 5, 5, 5]
    assert generate(model, [1, 5], penal)[:2] == [7, 5]  # prompt tokens count as seen
    assert generate_batch(model, [[1], [1, 5]], penal) == [[5, 7, 5, 5, 5, 5], [7, 5, 5, 5, 5, 5]]


def test_stop_ids_and_budgets():
    model = random_model()
    free = generate(model, [4, 5, 6], GenerationConfig(temperature=0.0, max_new_tokens=20))
    k = next(i for i in range(3, 20) if free[i] not in free[:i])
    assert generate(model, [4, 5, 6], GenerationConfig(temperature=0.0, max_new_tokens=20,
                                                       stop_ids=[free[k]])) == free[:k]
    assert generate(model, [4, 5, 6], GenerationConfig(temperature=0.0, max_new_tokens=0)) == []
    assert len(generate(model, [], GREEDY)) == 16  # an empty prompt starts from EOS


def test_a_prompt_longer_than_the_context_is_cut_from_the_left():
    model = random_model(max_seq_len=32)
    prompt = [int(t) for t in torch.randint(1, 300, (100,))]
    out = generate(model, prompt, GenerationConfig(temperature=0.0, max_new_tokens=10))
    assert len(out) == 10 and out == generate(model, prompt[-22:], GenerationConfig(temperature=0.0,
                                                                                     max_new_tokens=10))
    assert len(generate(model, prompt, GenerationConfig(temperature=0.0, max_new_tokens=500))) == 31


def test_generate_batch_matches_one_at_a_time():
    model = random_model()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12], [40, 41, 42], list(range(60, 160))]  # the last is cut
    free = [generate(model, p, GREEDY) for p in prompts]
    stop = free[0][5]
    cfg = GenerationConfig(temperature=0.0, max_new_tokens=16, stop_ids=[stop])
    expected = [generate(model, p, cfg) for p in prompts]
    assert any(len(e) < 16 for e in expected) and any(len(e) == 16 for e in expected)
    assert generate_batch(model, prompts, cfg) == expected
    rep = GenerationConfig(temperature=0.0, max_new_tokens=16, repetition_penalty=1.5)
    assert generate_batch(model, prompts, rep) == [generate(model, p, rep) for p in prompts]
    assert generate_batch(model, [], cfg) == []


def test_stream_text_never_splits_a_character(tok):
    text = "龘你好，鬱世界！🙂"  # rare characters and the emoji are out of vocabulary: byte tokens
    ids = tok.encode(text, add_special_tokens=False)
    assert any(tok.decode([i]).endswith("\ufffd") for i in ids)  # the case under test occurs
    pieces = list(stream_text(tok, iter(ids)))
    assert "".join(pieces) == text and len(pieces) > 3
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(stream_text(tok, iter(ids[:-1]))) == text[:-1]  # an unfinished last character is dropped


def test_stream_text_stop_strings_and_special_tokens(tok):
    ids = tok.encode("你好世界END学习", add_special_tokens=False)
    assert "".join(stream_text(tok, iter(ids), ["END"])) == "你好世界"
    assert "".join(stream_text(tok, iter(ids), ["学"])) == "你好世界END"
    tail = tok.encode("你好END龘", add_special_tokens=False)[:-1]  # ends inside a character
    assert "".join(stream_text(tok, iter(tail), ["END"])) == "你好"
    held = tok.encode("你好EN", add_special_tokens=False)
    assert "".join(stream_text(tok, iter(held), ["END"])) == "你好EN"  # a prefix that never completes
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert "".join(stream_text(tok, iter([*ids[:2], im_end, *ids[2:4]]))) == tok.decode(ids[:4])


def test_generate_stream_stops_after_a_stop_string(tok):
    a, b = tok.encode("你", add_special_tokens=False)[0], tok.encode("好", add_special_tokens=False)[0]
    model = constant_model({a: 8.0, b: 6.0})
    cfg = GenerationConfig(temperature=0.0, max_new_tokens=10, repetition_penalty=2.0,
                           stop_strings=[tok.decode([b, a])])
    assert list(generate_stream(model, [3], cfg)) == [a, b] + [a] * 8  # no tokenizer: stop strings unseen
    assert list(generate_stream(model, [3], cfg, tok)) == [a, b, a]
    text = "".join(stream_text(tok, generate_stream(model, [3], cfg, tok), cfg.stop_strings))
    assert text == tok.decode([a])


def reply_then_stop_model(tok) -> Llama:
    """Answers "学" then <|im_end|>: the prompt already holds <|im_end|>, so under repetition penalty 2 it
    scores 10/2 = 5 < 8 at first, then beats "学" (8/2 = 4) once that has been said."""
    a = tok.encode("学", add_special_tokens=False)[0]
    return constant_model({a: 8.0, tok.convert_tokens_to_ids("<|im_end|>"): 10.0})


def test_chat_reply_stops_at_im_end(tok):
    cfg = GenerationConfig(temperature=0.0, max_new_tokens=10, repetition_penalty=2.0)
    reply = chat_reply(reply_then_stop_model(tok), tok, [{"role": "user", "content": "你好"}], cfg)
    assert "".join(reply) == "学"


def make_run(tmp: Path, model: Llama, tiny_tokenizer_dir: Path) -> Path:
    run = tmp / "run"
    save_model_weights(model, run / "checkpoints" / "step-10")
    shutil.copytree(tiny_tokenizer_dir, run / "tokenizer")
    (run / "latest").write_text("step-10\n")
    return run


def scripted(lines: list[str]):
    feed = iter(lines)

    def input_fn(prompt: str) -> str:
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    return input_fn


def test_chat_session_with_reset_and_exit(tmp_path, tiny_tokenizer_dir, tok):
    run = make_run(tmp_path, reply_then_stop_model(tok), tiny_tokenizer_dir)
    out = io.StringIO()
    gen = GenerationConfig(temperature=0.0, max_new_tokens=8, repetition_penalty=2.0)
    lines = ["你好", "/reset", "再见", "/exit", "never read"]
    run_chat(str(run), gen, system="你是助手", input_fn=scripted(lines), output=out)
    text = out.getvalue()
    assert "parameters" in text and "/exit" in text  # the banner says what it is and how to quit
    assert text.count("xiaolm> 学\n") == 2 and "(conversation cleared)" in text


def test_chat_exits_on_eof_and_ctrl_c_stops_only_the_reply(tmp_path, tiny_tokenizer_dir, monkeypatch):
    run = make_run(tmp_path, random_model(), tiny_tokenizer_dir)
    out = io.StringIO()
    run_chat(str(run), GenerationConfig(max_new_tokens=4), input_fn=scripted([]), output=out)
    assert "parameters" in out.getvalue()

    def interrupted(*args, **kwargs):
        yield "半"
        raise KeyboardInterrupt

    monkeypatch.setattr("xiaolm.infer.chat.chat_reply", interrupted)
    out = io.StringIO()
    run_chat(str(run), GenerationConfig(max_new_tokens=4), input_fn=scripted(["你好", "再见"]), output=out)
    assert out.getvalue().count("xiaolm> 半 [stopped]\n") == 2


def test_trim_history_drops_oldest_exchanges_first(tok):
    from xiaolm.tokenizer import encode_prompt

    msgs = [{"role": "system", "content": "你是助手"}]
    for i in range(6):
        msgs += [{"role": "user", "content": f"问题{i}" * 5},
                 {"role": "assistant", "content": f"回答{i}" * 5}]
    msgs.append({"role": "user", "content": "最后的问题"})
    budget = len(encode_prompt(tok, msgs)) // 2
    kept = trim_history(tok, msgs, budget)
    assert len(encode_prompt(tok, kept)) <= budget
    assert kept[0] == msgs[0] and kept[1]["role"] == "user" and kept[-1] == msgs[-1]
    assert kept[1:] == msgs[len(msgs) - len(kept) + 1:]  # a suffix of the conversation
    assert trim_history(tok, msgs, 1) == [msgs[0], msgs[-1]]  # never drops the question itself


def test_engine_admits_a_request_mid_decode_and_each_row_matches_decoding_alone():
    from xiaolm.infer.generate import Engine

    model = random_model()
    a, b, c = [5, 6, 7, 8, 9], [12, 13], list(range(20, 40))
    cfg = GenerationConfig(temperature=0.0, max_new_tokens=12)
    alone = {tuple(p): generate(model, p, cfg) for p in (a, b, c)}
    engine = Engine(model, slots=3)
    out: dict[int, list[int]] = {}

    def step() -> None:
        for event in engine.step():
            out.setdefault(event.slot, []).append(event.token)

    sa = engine.add([a], [cfg])[0]
    for _ in range(4):
        step()
    sb, sc = engine.add([b, c], [cfg, replace(cfg, max_new_tokens=5)])  # join while a is 4 tokens in
    steps = engine.steps
    step()
    assert engine.steps == steps + 1 and engine.batch_sizes[-1] == 3  # one forward served all three rows
    engine.release(sc)  # a client gone: its row leaves at the next step
    while engine.rows:
        step()
    assert out[sa] == alone[tuple(a)] and out[sb] == alone[tuple(b)]
    assert out[sc] == alone[tuple(c)][:1]
    sd = engine.add([c], [cfg])[0]  # a freed slot is reused with a clean row
    while engine.rows:
        step()
    assert sd == sb or sd == sc or sd == sa
    assert out[sd][-12:] == alone[tuple(c)]


def test_engine_rows_keep_their_own_settings_and_seeds():
    from xiaolm.infer.generate import Engine

    model = random_model()
    greedy = GenerationConfig(temperature=0.0, max_new_tokens=10)
    hot = GenerationConfig(temperature=2.0, max_new_tokens=10, seed=3)
    engine = Engine(model, slots=4)
    slots = engine.add([[7, 8], [7, 8], [7, 8], [9]], [greedy, hot, replace(hot, top_k=1), replace(hot, min_p=1.0)])
    out: dict[int, list[int]] = {s: [] for s in slots}
    while engine.rows:
        for event in engine.step():
            out[event.slot].append(event.token)
    assert out[slots[0]] == generate(model, [7, 8], greedy) == out[slots[2]]  # top_k=1: greedy
    assert out[slots[1]] == generate(model, [7, 8], hot)  # its seed, unshifted by the other rows
    assert out[slots[3]] == generate(model, [9], greedy)  # min_p=1 keeps only the best token


def test_min_p_matches_transformers():
    from transformers.generation.logits_process import MinPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    for p in (0.05, 0.3, 0.9):
        assert torch.equal(filter_logits(logits, min_p=p).isinf(), MinPLogitsWarper(p)(None, logits).isinf())
    per_row = filter_logits(logits, top_k=torch.tensor([1, 5, 0, 50]), top_p=torch.tensor([1.0, 1.0, 0.5, 1.0]))
    for i, (k, p) in enumerate([(1, 1.0), (5, 1.0), (0, 0.5), (50, 1.0)]):
        assert torch.equal(per_row[i].isinf(), filter_logits(logits[i:i + 1], top_k=k, top_p=p)[0].isinf())


def test_unseeded_engine_rows_draw_from_the_filtered_distribution():
    from xiaolm.infer.generate import Engine

    torch.manual_seed(0)
    scores = {5: 2.0, 6: 1.0, 7: 0.0}  # with the 297 other tokens at 0: token 5 has p = e² / (e² + e + 298)
    model = constant_model(scores)
    logits = torch.zeros(300)
    for token, value in scores.items():
        logits[token] = value
    want = logits.softmax(-1)
    free, nucleus = GenerationConfig(temperature=1.0, max_new_tokens=1), \
        GenerationConfig(temperature=1.0, max_new_tokens=1, top_p=0.02)
    counts, kept = torch.zeros(300), set()
    for _ in range(25):
        engine = Engine(model, slots=32)
        slots = engine.add([[1]] * 32, [free] * 24 + [nucleus] * 8)
        for event in engine.step():
            if event.token is None:
                continue
            if event.slot in slots[:24]:
                counts[event.token] += 1
            else:
                kept.add(event.token)
    assert kept == {5}  # top_p 0.02 keeps only the most likely token (p = 0.024)
    share = counts / counts.sum()  # 600 draws: token 5's share within 4 standard errors of its probability
    assert abs(float(share[5] - want[5])) < 4 * (float(want[5] * (1 - want[5])) / 600) ** 0.5
    assert int((counts > 0).sum()) > 100  # the flat tail is drawn from too


@pytest.mark.slow
def test_a_compiled_decode_step_gives_the_same_greedy_tokens():
    from xiaolm.infer.generate import Engine

    model = random_model()
    cfg = GenerationConfig(temperature=0.0, max_new_tokens=12)
    engine = Engine(model, slots=2, compile=True)  # torch.compile of the decode step (rows at different lengths)
    slots = engine.add([[7, 8, 9], [5]], [cfg, cfg])
    out: dict[int, list[int]] = {s: [] for s in slots}
    while engine.rows:
        for event in engine.step():
            if event.token is not None:
                out[event.slot].append(event.token)
    assert out[slots[0]] == generate(model, [7, 8, 9], cfg)
    assert out[slots[1]] == generate(model, [5], cfg)


def _run(engine, prompts: list[list[int]], cfg: GenerationConfig) -> tuple[list[int], list[list[int]]]:
    """Slots and new tokens of prompts added together to a live engine, decoded to the end."""
    slots = engine.add(prompts, [cfg] * len(prompts))
    out: dict[int, list[int]] = {s: [] for s in slots}
    while engine.rows:
        for event in engine.step():
            if event.token is not None:
                out[event.slot].append(event.token)
    return slots, [out[s] for s in slots]


def test_a_next_turn_reuses_its_slots_kept_tokens_and_decodes_as_a_fresh_prefill():
    from xiaolm.infer.generate import Engine

    model, cfg = random_model(), GenerationConfig(temperature=0.0, max_new_tokens=8)
    engine = Engine(model, slots=3)
    first = [5, 6, 7, 8, 9]
    (s1,), (reply,) = _run(engine, [first], cfg)
    (s2,), _ = _run(engine, [[60, 61, 62]], cfg)  # another slot decodes while s1 sits idle below it
    assert s2 != s1 and engine.reused == 0
    turn2 = first + reply + [11, 12]  # a chat resends its history
    other = [40, 41, 42, 43]
    slots, outs = _run(engine, [other, turn2], cfg)  # prefilled together from different positions
    # every token s1 fed to the model is kept: the prompt and the reply but its last token (never fed back)
    assert slots[1] == s1 and engine.reused == len(first) + len(reply) - 1
    assert outs == [generate(model, other, cfg), generate(model, turn2, cfg)]
    assert engine.prefilled == len(first) + 3 + len(other) + len(turn2) - engine.reused


def test_reuse_gives_way_when_the_rows_would_run_past_the_cache():
    from xiaolm.infer.generate import Engine

    model, cfg = random_model(max_seq_len=64), GenerationConfig(temperature=0.0, max_new_tokens=4)
    engine = Engine(model, slots=2)
    long = list(range(10, 60))
    (s1,), (reply,) = _run(engine, [long], cfg)
    turn2, fresh = long + reply + [7], list(range(100, 140))  # 50 kept + a 40-token chunk would need 90 positions
    slots, outs = _run(engine, [turn2, fresh], cfg)
    assert slots[0] == s1 and outs == [generate(model, turn2, cfg), generate(model, fresh, cfg)]


def test_chat_turns_on_one_engine_reuse_the_history_and_reply_as_a_fresh_engine_does(tok):
    from xiaolm.infer.generate import Engine

    model = random_model(vocab=len(tok), max_seq_len=128)
    cfg = GenerationConfig(temperature=0.0, max_new_tokens=6)
    engine = Engine(model, 1)
    history = [{"role": "user", "content": "你好"}]
    first = "".join(chat_reply(model, tok, history, cfg, engine))
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "再见"}]
    stream = chat_reply(model, tok, history, cfg, engine)
    next(stream, None)  # the reply starts...
    stream.close()  # a reply stopped early (Ctrl-C in `xiaolm chat`) frees the engine's slot
    assert engine.free == 1 and engine.reused > 0
    assert "".join(chat_reply(model, tok, history, cfg, engine)) == "".join(chat_reply(model, tok, history, cfg))


def test_a_lone_row_in_a_high_slot_decodes_without_the_idle_slots_below_it():
    from xiaolm.infer.generate import Engine

    model, cfg = random_model(), GenerationConfig(temperature=0.0, max_new_tokens=5)
    engine = Engine(model, slots=4)
    prompts = [[10 + i, 20 + i, 30 + i] for i in range(4)]
    slots, _ = _run(engine, prompts, cfg)
    rows: list[int] = []
    decode = engine._decode
    engine._decode = lambda ids, **kw: rows.append(ids.shape[0]) or decode(ids, **kw)
    again = prompts[3] + [7, 8]
    (slot,), (out,) = _run(engine, [again], cfg)  # it goes where its first tokens are kept: the last slot
    assert slot == slots[3] == 3 and set(rows) == {1} and out == generate(model, again, cfg)


def test_a_prefill_that_fails_part_way_leaves_no_stale_kept_tokens():
    from xiaolm.infer.generate import Engine

    model, cfg = random_model(), GenerationConfig(temperature=0.0, max_new_tokens=4)
    engine = Engine(model, slots=1)
    first = [5, 6, 7, 8, 9]
    _run(engine, [first], cfg)
    layer = model.model.layers[1]

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory")

    layer.forward = fail  # the first layer writes its keys/values for positions 2-4, then the prefill fails
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.add([[5, 6, 40, 41, 42]], [cfg])
    del layer.forward
    again = [*first, 11]
    assert _run(engine, [again], cfg)[1] == [generate(model, again, cfg)] and engine.reused == 2
