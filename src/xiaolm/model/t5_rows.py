"""How a T5 reads the decoder-only rows every objective builds (x = ids[:-1], y = labels[1:], -100 where nothing
is trained): in a row, or in each packed document of a row, the last labelled run of y is the target and what
comes before it the source. The results say where each target token sits in y, so per-token outputs go back."""

from __future__ import annotations

import torch

from xiaolm.model.loss import IGNORE


def split_rows(x: torch.Tensor, y: torch.Tensor, pad: int) -> dict[str, torch.Tensor]:
    """Decoder-only rows (x, y) → source, decoder input and target of each row's last labelled run of y."""
    b, t = y.shape
    idx = torch.arange(t, device=y.device)
    valid = y != IGNORE
    before = torch.zeros_like(valid)
    before[:, 1:] = valid[:, :-1]
    start = torch.where(valid & ~before, idx, -1).max(1).values  # first position of the last run
    end = torch.where(valid, idx, -1).max(1).values
    src_len = (start + 1).clamp(min=1)
    tgt_len = torch.where(start >= 0, end - start + 1, 0)
    s, n = int(src_len.max()), max(1, int(tgt_len.max()))
    src_mask = idx[None, :s] < src_len[:, None]
    src = x[:, :s].masked_fill(~src_mask, pad)
    j = torch.arange(n, device=y.device)
    tgt_mask = j[None] < tgt_len[:, None]
    at = (start.clamp(min=0)[:, None] + j[None]).clamp(max=t - 1)  # y position of each target token
    tgt = y.gather(1, at).masked_fill(~tgt_mask, IGNORE)
    dec = x.gather(1, at).masked_fill(~tgt_mask, pad)
    dec[:, 0] = pad  # the start token; dec[j] = x[start + j] is target token j - 1
    return {"src": src, "src_mask": src_mask, "dec": dec, "tgt": tgt, "at": at, "tgt_mask": tgt_mask}


def split_packed_rows(x: torch.Tensor, y: torch.Tensor, doc: torch.Tensor, pad: int) -> dict[str, torch.Tensor]:
    """split() for packed rows: each document of a row (doc ids [B,T], as collate_packed numbers them) gives its
    source and its target, laid end to end in the row's source and target; seg and pos say where each came
    from. Documents without a labelled token (the padding) are dropped."""
    rows = []
    for b in range(x.shape[0]):
        labelled = (y[b] != IGNORE).tolist()
        src: list[int] = []
        src_seg: list[int] = []
        at: list[int] = []
        dec_seg: list[int] = []
        bounds = torch.nonzero(torch.diff(doc[b], prepend=doc[b, :1] - 1)).flatten().tolist() + [x.shape[1]]
        for seg, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            marks = [i for i in range(lo, hi) if labelled[i]]
            if not marks:
                continue
            end, start = marks[-1], marks[-1]
            while start > lo and labelled[start - 1]:  # the segment's last labelled run
                start -= 1
            src += range(lo, start + 1)
            src_seg += [seg] * (start + 1 - lo)
            at += range(start, end + 1)
            dec_seg += [seg] * (end + 1 - start)
        rows.append((src, src_seg, at, dec_seg))
    s, n = max(len(r[0]) for r in rows), max(len(r[2]) for r in rows)
    dev = x.device
    out = {"src": torch.full((len(rows), s), pad, dtype=torch.long, device=dev),
           "src_seg": torch.full((len(rows), s), -1, dtype=torch.long, device=dev),
           "src_pos": torch.zeros((len(rows), s), dtype=torch.long, device=dev),
           "dec": torch.full((len(rows), n), pad, dtype=torch.long, device=dev),
           "tgt": torch.full((len(rows), n), IGNORE, dtype=torch.long, device=dev),
           "at": torch.zeros((len(rows), n), dtype=torch.long, device=dev),
           "dec_seg": torch.full((len(rows), n), -2, dtype=torch.long, device=dev),
           "dec_pos": torch.zeros((len(rows), n), dtype=torch.long, device=dev)}
    for b, (src, src_seg, at, dec_seg) in enumerate(rows):
        index = torch.tensor(at, device=dev)
        src_seg_t, dec_seg_t = torch.tensor(src_seg, device=dev), torch.tensor(dec_seg, device=dev)
        first, dec_pos = _segment_starts(dec_seg_t)
        out["src"][b, :len(src)] = x[b, src]
        out["src_seg"][b, :len(src)] = src_seg_t
        out["src_pos"][b, :len(src)] = _segment_starts(src_seg_t)[1]
        out["dec"][b, :len(at)] = torch.where(first, pad, x[b, index])  # each target starts from the pad token
        out["tgt"][b, :len(at)] = y[b, index]
        out["at"][b, :len(at)] = index
        out["dec_seg"][b, :len(at)] = dec_seg_t
        out["dec_pos"][b, :len(at)] = dec_pos
    out["src_mask"] = out["src_seg"] >= 0
    out["tgt_mask"] = out["dec_seg"] >= 0
    return out


def _segment_starts(seg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(whether each token starts its segment, its position within the segment) for segment ids [N]."""
    first = torch.ones(len(seg), dtype=torch.bool, device=seg.device)
    first[1:] = seg[1:] != seg[:-1]
    index = torch.arange(len(seg), device=seg.device)
    return first, index - torch.where(first, index, 0).cummax(0).values
