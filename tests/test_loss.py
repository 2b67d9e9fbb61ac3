"""Chunked cross-entropy fused with the output projection equals the plain logits → cross_entropy path."""

import pytest
import torch
import torch.nn.functional as F

from xiaolm.model.loss import linear_cross_entropy


def plain_and_fused(chunk, dtype=torch.float32, ignore_rows=5):
    torch.manual_seed(0)
    h = torch.randn(37, 16, dtype=dtype)
    w = (torch.randn(50, 16) * 0.3)
    t = torch.randint(0, 50, (37,))
    t[:ignore_rows] = -100
    results = []
    for fused in (False, True):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        if fused:
            loss = linear_cross_entropy(hh, ww, t, chunk=chunk)
        else:
            loss = F.cross_entropy((hh @ ww.to(dtype).t()).float(), t, ignore_index=-100)
        (loss * 3.0).backward()  # a non-unit upstream gradient must be honoured
        results.append((loss.detach(), hh.grad, ww.grad))
    return results


@pytest.mark.parametrize("chunk", [1, 7, 37, 1000])
def test_loss_and_gradients_equal_the_plain_path_for_any_chunk(chunk):
    (l0, gh0, gw0), (l1, gh1, gw1) = plain_and_fused(chunk)
    assert abs(l0.item() - l1.item()) < 1e-5
    assert (gh0 - gh1).abs().max() < 1e-6 and (gw0 - gw1).abs().max() < 1e-6
    assert gw1.dtype == torch.float32 and gh1[:5].abs().max() == 0  # ignored rows get no gradient


def test_bfloat16_hidden_states_stay_close_to_float32():
    (l0, _, gw0), (l1, _, gw1) = plain_and_fused(8, dtype=torch.bfloat16)
    assert l1.dtype == torch.float32
    assert abs(l0.item() - l1.item()) < 2e-2
    assert (gw0 - gw1).abs().max() < 2e-2


def test_all_targets_ignored_gives_zero_loss_and_gradient():
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0 and h.grad.abs().max() == 0 and w.grad.abs().max() == 0


def test_without_gradients_only_the_loss_is_computed():
    h, w, t = torch.randn(6, 8), torch.randn(10, 8), torch.randint(0, 10, (6,))
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, t, chunk=4)
    assert abs(loss.item() - F.cross_entropy(h @ w.t(), t).item()) < 1e-5


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_token_logprobs_and_gradients_equal_a_plain_log_softmax(chunk):
    from xiaolm.model.loss import linear_token_logprobs

    torch.manual_seed(0)
    h = torch.randn(40, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (40,))
    t[::6] = -100
    got = linear_token_logprobs(h, w, t, chunk=chunk)
    plain = F.log_softmax(h @ w.t(), dim=-1).gather(1, t.clamp(min=0)[:, None]).squeeze(1) * (t != -100)
    assert torch.allclose(got, plain, atol=1e-5)
    assert (got[::6] == 0).all()
    weights = torch.randn(40)  # any downstream use: a weighted sum, as DPO's sums per sequence
    g_got = torch.autograd.grad((got * weights).sum(), (h, w))
    g_plain = torch.autograd.grad((plain * weights).sum(), (h, w))
    for a, b in zip(g_got, g_plain, strict=True):
        assert torch.allclose(a, b, atol=1e-4)


def test_model_gives_per_token_logprobs_and_hidden_states():
    from xiaolm.model.llama import Llama, LlamaConfig

    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16))
    x = torch.randint(0, 64, (2, 9))
    y = torch.randint(0, 64, (2, 9))
    logits, _ = model(x)
    expected = F.log_softmax(logits, dim=-1).gather(2, y[..., None]).squeeze(-1)
    assert torch.allclose(model(x, y, output="logprobs"), expected, atol=1e-5)
    hidden = model(x, output="hidden")
    assert hidden.shape == (2, 9, 32)
    assert torch.allclose(model.lm_head(hidden), logits, atol=1e-5)
    _, loss = model(x, y)
    assert torch.allclose(-expected.mean(), loss, atol=1e-5)
