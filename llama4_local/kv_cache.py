"""KV caches for the two kinds of Llama 4 attention layer.

Shapes: K and V are kept as [KV, S, hd] (kv heads, slots, head dim) so a prefix slice is a
view that attention can read directly.

- `FullKV` (NoPE layers): every past position; grows geometrically, up to `max_len`.
- `ChunkedKV` (RoPE layers): chunked attention only looks back to the start of the current
  aligned block of `chunk` positions, so the buffer holds at most `chunk` positions: the ones
  from the current block's start. When a block ends the buffer starts over.
"""

from __future__ import annotations

import torch


class _Buffer:
    """K and V storage that grows by doubling up to a hard limit."""

    def __init__(self, kv_heads: int, head_dim: int, limit: int, dtype, device, initial: int = 256):
        self.limit = limit
        cap = min(initial, limit)
        self.k = torch.empty(kv_heads, cap, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def reserve(self, n: int, keep: int) -> None:
        """Make room for n slots, keeping the first `keep`."""
        if n <= self.capacity:
            return
        if n > self.limit:
            raise ValueError(f"KV buffer needs {n} slots, limit is {self.limit}")
        cap = min(max(n, 2 * self.capacity), self.limit)
        k = self.k.new_empty(self.k.shape[0], cap, self.k.shape[2])
        v = torch.empty_like(k)
        k[:, :keep] = self.k[:, :keep]
        v[:, :keep] = self.v[:, :keep]
        self.k, self.v = k, v

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class FullKV:
    """Whole history; slot i holds position i."""

    chunked = False

    def __init__(self, kv_heads, head_dim, max_len, dtype, device):
        self.buf = _Buffer(kv_heads, head_dim, max_len, dtype, device)
        self.length = 0

    def update(self, pos0: int, k: torch.Tensor, v: torch.Tensor):
        """Store new k, v [KV, T, hd] for positions pos0..pos0+T-1.

        Returns (keys, values, first key position) to attend over.
        """
        assert pos0 == self.length, f"cache holds {self.length} positions, got pos0={pos0}"
        t = k.shape[1]
        self.buf.reserve(pos0 + t, keep=pos0)
        self.buf.k[:, pos0 : pos0 + t] = k
        self.buf.v[:, pos0 : pos0 + t] = v
        self.length = pos0 + t
        return self.buf.k[:, : self.length], self.buf.v[:, : self.length], 0

    def append_slot(self, pos0: int) -> int:
        """The slot of buf.k / buf.v where one new position pos0 goes (room made for it); attention
        then reads slots 0..slot; `appended` after the slot is written. What update does for one
        token, for a caller that writes the slot itself (cpu_decode)."""
        assert pos0 == self.length, f"cache holds {self.length} positions, got pos0={pos0}"
        self.buf.reserve(pos0 + 1, keep=pos0)
        return pos0

    def appended(self, pos0: int) -> None:
        self.length = pos0 + 1

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)


class ChunkedKV:
    """Positions from the start of the current aligned block; slot i holds position start + i."""

    chunked = True

    def __init__(self, kv_heads, head_dim, chunk, dtype, device, max_len: int | None = None, keep_previous=False):
        self.chunk = chunk
        # With keep_previous, the block before the current one is kept too (a copy made when a
        # block ends), so the cache can be rewound into it: a server reusing a conversation's
        # cache cuts it back to the common prefix, which may lie just before a block boundary.
        self.keep_previous = keep_previous
        self.prev: tuple[torch.Tensor, torch.Tensor, int] | None = None  # (k, v, first position)
        # Never more than one block, and never more than the whole context.
        limit = min(chunk, max_len) if max_len else chunk
        self.buf = _Buffer(kv_heads, head_dim, limit, dtype, device)
        self.start = 0  # absolute position held in slot 0
        self.length = 0  # absolute positions covered: [0, length)

    def update(self, pos0: int, k: torch.Tensor, v: torch.Tensor):
        assert pos0 == self.length, f"cache holds {self.length} positions, got pos0={pos0}"
        t = k.shape[1]
        end = pos0 + t
        held = pos0 - self.start  # slots in use: positions [start, pos0)
        c = self.chunk
        if (end - 1) // c == pos0 // c:
            # All new positions fall in the block the buffer holds: append, attend over the buffer.
            self.buf.reserve(held + t, keep=held)
            self.buf.k[:, held : held + t] = k
            self.buf.v[:, held : held + t] = v
            keys, values, first = self.buf.k[:, : held + t], self.buf.v[:, : held + t], self.start
        else:
            # The new tokens cross a block boundary (prefill): attend over held + new, then keep
            # only the last block's part.
            keys = torch.cat([self.buf.k[:, :held], k], dim=1)
            values = torch.cat([self.buf.v[:, :held], v], dim=1)
            first = self.start
        self._advance(end, keys, values, first, k, v)
        return keys, values, first

    def _advance(self, end: int, keys=None, values=None, first: int | None = None, k=None, v=None) -> None:
        """Cover positions up to `end`, keys / values holding [first, end) (None: the buffer's
        slots from start) and k / v the new ones: where a block ended among them the buffer
        starts over with what follows it."""
        c = self.chunk
        new_start = (end // c) * c
        if new_start > self.start:
            if keys is None:
                first = self.start
                keys, values = self.buf.k[:, : end - first], self.buf.v[:, : end - first]
            if self.keep_previous:
                a = max(first, new_start - c)  # keys hold positions [first, end)
                lo, hi = a - first, new_start - first
                self.prev = (keys[:, lo:hi].clone(), values[:, lo:hi].clone(), a)
            keep = end - new_start  # positions [new_start, end), all among the new tokens
            if keep:
                t = k.shape[1]
                self.buf.reserve(keep, keep=0)
                self.buf.k[:, :keep] = k[:, t - keep :]
                self.buf.v[:, :keep] = v[:, t - keep :]
            self.start = new_start
        self.length = end

    def append_slot(self, pos0: int) -> int:
        """As FullKV.append_slot: one new position's slot (slots 0..slot then hold [start, pos0])."""
        assert pos0 == self.length, f"cache holds {self.length} positions, got pos0={pos0}"
        held = pos0 - self.start  # one position never crosses a block: it lands in the held one
        self.buf.reserve(held + 1, keep=held)
        return held

    def appended(self, pos0: int) -> None:
        self._advance(pos0 + 1)

    def can_truncate(self, length: int) -> bool:
        if length >= self.start:
            return True
        block = (length // self.chunk) * self.chunk
        return self.prev is not None and self.prev[2] <= block and length <= self.start

    def truncate(self, length: int) -> None:
        if length >= self.length:
            return
        if length >= self.start:
            self.length = length
            return
        if not self.can_truncate(length):
            raise ValueError("cannot rewind a chunked cache past the start of the block it keeps")
        k, v, first = self.prev
        block = (length // self.chunk) * self.chunk
        n = length - block
        self.buf.reserve(max(n, 1), keep=0)
        self.buf.k[:, :n] = k[:, block - first : length - first]
        self.buf.v[:, :n] = v[:, block - first : length - first]
        self.start, self.length, self.prev = block, length, None


class KVCache:
    """One cache per decoder layer, of the kind the layer needs."""

    def __init__(self, cfg, max_len: int, dtype, device, keep_previous: bool = False):
        self.max_len = max_len
        self.decoder = None  # (model, graph?, step): graph_decode's stepper bound to these buffers
        self.layers = []
        for i in range(cfg.num_layers):
            if cfg.chunked_layers[i]:
                c = cfg.attention_chunk_size
                kv = ChunkedKV(cfg.num_kv_heads, cfg.head_dim, c, dtype, device, max_len, keep_previous)
                self.layers.append(kv)
            else:
                self.layers.append(FullKV(cfg.num_kv_heads, cfg.head_dim, max_len, dtype, device))

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0

    def rewind(self, length: int) -> bool:
        """Cut every layer back to its first `length` positions; False (and nothing cut) where a
        chunked layer no longer holds the block that position falls in."""
        if not all(kv.can_truncate(length) for kv in self.layers if kv.chunked):
            return False
        for kv in self.layers:
            kv.truncate(length)
        return True

    def nbytes(self) -> int:
        prev = sum(2 * kv.prev[0].nbytes for kv in self.layers if getattr(kv, "prev", None) is not None)
        return sum(layer.buf.nbytes() for layer in self.layers) + prev
