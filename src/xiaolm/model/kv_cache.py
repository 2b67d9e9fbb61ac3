"""The KV cache every architecture hands out through `model.new_kv_cache`: preallocated, with a length per row.

Rows may stand at different lengths (continuous batching puts requests that started at different times in one
batch): a forward then writes each row's new keys/values at that row's own positions and masks each row's view
to what it has written. When every row is at the same length (one stream, or a fresh batch) the writes are plain
slices and no mask is built, which keeps single-stream decoding on the fastest path.
"""

from __future__ import annotations

import copy

import torch


class KVCache:
    """Keys/values per layer [B, n_kv_heads, max_len, head_dim]; row b holds `lengths[b]` positions."""

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int, max_len: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len
        self.end = 0  # kept on the host: no row is longer, so a forward reads keys [0, end + t)
        self.ragged = False  # rows at different lengths: per-row writes, positions and masks
        self.rows: slice | torch.Tensor | None = None  # the rows a forward reads and writes (None: all)
        self._write: torch.Tensor | None = None  # per-row write positions [B, t] of the running forward

    @property
    def length(self) -> int:
        """Positions filled in the longest row (all rows when they advance together)."""
        return self.end

    def set_length(self, n: int) -> None:
        """Mark the first n positions of every row as filled (keys/values copied into k and v directly)."""
        self.lengths.fill_(n)
        self.end = n

    def view(self, rows: slice | torch.Tensor, end: int, ragged: bool) -> KVCache:
        """The same storage, a forward reading and writing only `rows` (none longer than `end`)."""
        sub = copy.copy(self)
        sub.rows, sub.end, sub.ragged = rows, end, ragged
        return sub

    def row_lengths(self) -> torch.Tensor:
        """Lengths of the rows this cache (or view) works on."""
        return self.lengths if self.rows is None else self.lengths[self.rows]

    def prepare(self, t: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(positions [B,t], attention mask [B,1,t,end+t]) for t new tokens; (None, None) when rows are even."""
        if not self.ragged:
            self._write = None
            return None, None
        positions = self.row_lengths()[:, None] + torch.arange(t, device=self.lengths.device)
        self._write = positions
        keys = torch.arange(self.end + t, device=positions.device)
        return positions, (keys[None, None, :] <= positions[:, :, None])[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this forward's k/v [B,H,t,hd] for `layer` and return each row's keys/values [0, end + t)."""
        end = self.end + k.shape[2]
        kc, vc = self.k[layer], self.v[layer]
        k, v = k.to(kc.dtype), v.to(vc.dtype)  # autocast makes half-precision k/v for a cache of the weights' dtype
        if isinstance(self.rows, torch.Tensor):  # scattered rows: index writes, gathered reads
            if self._write is None:
                kc[self.rows, :, self.end:end] = k
                vc[self.rows, :, self.end:end] = v
            else:
                kc[self.rows[:, None], :, self._write] = k.transpose(1, 2)
                vc[self.rows[:, None], :, self._write] = v.transpose(1, 2)
            return kc[self.rows, :, :end], vc[self.rows, :, :end]
        if self.rows is not None:
            kc, vc = kc[self.rows], vc[self.rows]
        if self._write is None:
            kc[:, :, self.end:end] = k
            vc[:, :, self.end:end] = v
        else:
            index = torch.arange(k.shape[0], device=k.device)[:, None]
            kc[index, :, self._write] = k.transpose(1, 2)
            vc[index, :, self._write] = v.transpose(1, 2)
        return kc[:, :, :end], vc[:, :, :end]

    def advance(self, t: int) -> None:
        """Count t more positions in every row of this cache (or view) once all layers have written."""
        if self.rows is None:
            self.lengths += t
        else:
            self.lengths[self.rows] += t
        self.end += t
        self._write = None
