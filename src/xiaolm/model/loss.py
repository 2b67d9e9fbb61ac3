"""Cross-entropy and per-token log-probabilities fused with the output projection, computed in row chunks.

The logits of a whole batch ([tokens, vocab] floats: 1 GB for 8k tokens × 32k vocab) never exist at once. Each
chunk's logits are made, turned into the loss and into the gradients for the hidden states and the output
weight, and freed; backward then only scales the stored gradients. That is also faster than the plain path:
no [tokens, vocab] zero-fill, log-softmax and its backward pass (see benchmarks/train_step.py).
"""

from __future__ import annotations

import torch

IGNORE = -100


class _LinearCrossEntropy(torch.autograd.Function):
    """mean over targets != -100 of -log softmax(h @ wᵀ)[target], gradients made in the forward pass."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        valid = targets != IGNORE
        safe = targets.clamp(min=0)
        count = valid.sum().clamp(min=1)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_grad else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_grad else None
        w_c = w.to(h.dtype)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for i in range(0, h.shape[0], chunk):
            h_c, t_c, v_c = h[i:i + chunk], safe[i:i + chunk], valid[i:i + chunk]
            # float32 for the softmax: bf16/fp16 logits lose the small differences the loss is made of
            logits = (h_c @ w_c.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, t_c.unsqueeze(1)).squeeze(1)
            total += ((lse - picked) * v_c).sum()
            if need_grad:  # d loss / d logits = softmax - onehot (rows of ignored targets are zero)
                probs = logits.sub_(lse.unsqueeze(1)).exp_()
                probs[torch.arange(len(t_c), device=h.device), t_c] -= 1.0
                probs.mul_(v_c.unsqueeze(1))
                probs_c = probs.to(h.dtype)
                grad_h[i:i + chunk] = probs_c @ w_c
                if h.dtype == torch.float32:
                    grad_w.addmm_(probs_c.t(), h_c)
                else:  # half-precision matmul, float32 sum across chunks
                    grad_w += (probs_c.t() @ h_c).float()
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w, count)
            ctx.w_dtype = w.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w, count = ctx.saved_tensors
        scale = grad_out / count
        return grad_h * scale.to(grad_h.dtype), (grad_w * scale).to(ctx.w_dtype), None, None


# Logit elements per chunk: ~4 MB of float32 stays in a CPU's cache; a GPU wants big matmuls instead.
CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 25}


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int | None = None) -> torch.Tensor:
    """Mean next-token loss of hidden states h [N, D] against targets [N] (-100 = ignore), head weight [V, D]."""
    if chunk is None:
        chunk = max(1, CHUNK_ELEMENTS.get(h.device.type, 1 << 22) // weight.shape[0])
    return _LinearCrossEntropy.apply(h, weight, targets, chunk)


class _LinearTokenLogprobs(torch.autograd.Function):
    """log softmax(h @ wᵀ)[target] per row (0 where target is -100); backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        valid = targets != IGNORE
        safe = targets.clamp(min=0)
        out = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
        w_c = w.to(h.dtype)
        for i in range(0, h.shape[0], chunk):
            logits = (h[i:i + chunk] @ w_c.t()).float()
            picked = logits.gather(1, safe[i:i + chunk].unsqueeze(1)).squeeze(1)
            out[i:i + chunk] = (picked - torch.logsumexp(logits, dim=-1)) * valid[i:i + chunk]
        ctx.save_for_backward(h, w, safe, valid)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        h, w, safe, valid = ctx.saved_tensors
        w_c = w.to(h.dtype)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        g = grad_out.float() * valid
        for i in range(0, h.shape[0], ctx.chunk):
            h_c, t_c = h[i:i + ctx.chunk], safe[i:i + ctx.chunk]
            # d logp[t] / d logits = onehot(t) - softmax, scaled by the incoming gradient of each row
            probs = (h_c @ w_c.t()).float().softmax(dim=-1).neg_()
            probs[torch.arange(len(t_c), device=h.device), t_c] += 1.0
            probs.mul_(g[i:i + ctx.chunk].unsqueeze(1))
            probs_c = probs.to(h.dtype)
            grad_h[i:i + ctx.chunk] = probs_c @ w_c
            grad_w += (probs_c.t() @ h_c).float()
        return grad_h, grad_w.to(w.dtype), None, None


def linear_token_logprobs(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk: int | None = None) -> torch.Tensor:
    """log p(target) [N] float32 of hidden states h [N, D] under head weight [V, D]; 0 where target is -100.

    The sums DPO, reward and RL losses need (per sequence, per token); the [N, V] logits never exist at once.
    """
    if chunk is None:
        chunk = max(1, CHUNK_ELEMENTS.get(h.device.type, 1 << 22) // weight.shape[0])
    return _LinearTokenLogprobs.apply(h, weight, targets, chunk)
