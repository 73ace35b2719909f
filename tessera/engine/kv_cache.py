"""A preallocated, slot-based KV cache for continuous batching.

Layout: per layer, one key and one value tensor of shape [slots, Hkv, max_len, hd], allocated once.
A running sequence owns one slot; its tokens live at positions [0, length) of that slot.

Why slots (and not pages or a growing cache):
- The model's attention takes dense [B, Hkv, S, hd] keys/values plus a bool mask (docs/CONTRACTS.md), so
  a paged cache would have to gather its pages into a dense tensor at every layer of every step. Slots are
  already dense.
- The engine keeps the running sequences in the slot prefix [0, B) (when one finishes, the last one is
  moved into its hole, see `move`), so a decode step reads the plain view `k[0:B, :, :S]` without copying.
  New sequences are prefilled into the slots just after the running ones, again a contiguous range.
- The price is memory: every slot reserves `max_len` positions whether it uses them or not. With the tiny
  preset that is 8 MB per slot at max_len 2048 in float32; for big models choose `slots` and `max_len` to fit.
Ragged lengths inside one view are handled by the attention mask the engine builds (keys past a row's
length are masked out), and `update` writes each row at that row's own positions.

Sliding-window layers (GPT-OSS: `windows` {layer: W}) keep only their window: a ring of W positions per slot,
position p at index p mod W. A decode step reads the ring (every entry it holds is inside the window: the W
latest positions), masked by the first W columns of the engine's mask — ring index r holds a real key iff
r <= p, which is what the mask's column r says. A prefill (which starts at position 0) attends over its own fresh
keys and writes only each row's last W real positions into the ring, so it needs the rows' `lengths`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class CacheGeometry:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    slots: int
    max_len: int
    windows: dict[int, int] = field(
        default_factory=dict
    )  # sliding layer → its window (ring length)

    def layer_len(self, layer_idx: int) -> int:
        """Positions layer `layer_idx` stores per slot: max_len, or its window when that is shorter."""
        w = self.windows.get(layer_idx, 0)
        return min(w, self.max_len) if w else self.max_len

    def bytes(self, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        per_position = 2 * self.slots * self.num_kv_heads * self.head_dim * elem
        return per_position * sum(self.layer_len(i) for i in range(self.num_layers))


class SlotKVCache:
    """Preallocated keys/values for `slots` sequences of up to `max_len` tokens each."""

    def __init__(
        self,
        geometry: CacheGeometry,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ):
        g = geometry
        self.geometry = g
        # [slots, Hkv, max_len (or the window W of a sliding layer), hd]
        shapes = [
            (g.slots, g.num_kv_heads, g.layer_len(i), g.head_dim) for i in range(g.num_layers)
        ]
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
        # the layers stored as rings (a window shorter than max_len): layer → ring length
        self.ring = {i: g.layer_len(i) for i in range(g.num_layers) if g.layer_len(i) < g.max_len}

    def view(
        self,
        first_slot: int,
        positions: torch.Tensor,
        kv_len: int,
        lengths: torch.Tensor | None = None,
    ) -> SlotView:
        """A cache object for one forward over slots [first_slot, first_slot + B).

        positions: [B, T] absolute positions the new tokens are written at (row b goes to slot first_slot + b);
        within a row they must be distinct (they are: a row's tokens sit at consecutive positions).
        kv_len: S, how many positions of each slot the attention reads (the longest row's end).
        lengths: [B] real tokens per row of a right-padded prefill; needed (T > 1) when the cache has rings.
        """
        if self.ring and positions.shape[1] > 1:
            if lengths is None or int(positions[:, 0].max()) != 0:
                raise ValueError(
                    "a multi-token forward into a cache with sliding-window rings must be a prefill "
                    "from position 0 with the rows' lengths given"
                )
        B = positions.shape[0]
        if first_slot < 0 or first_slot + B > self.geometry.slots:
            raise ValueError(
                f"slots [{first_slot}, {first_slot + B}) outside the cache's {self.geometry.slots} slots"
            )
        if kv_len > self.geometry.max_len or int(positions.max()) >= self.geometry.max_len:
            raise ValueError(
                f"positions up to {int(positions.max())} / kv_len {kv_len} exceed max_len {self.geometry.max_len}"
            )
        return SlotView(self, first_slot, positions, kv_len, lengths)

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst` (every layer; a ring whole)."""
        for k, v in zip(self.k, self.v):
            n = min(length, k.shape[2])
            k[dst, :, :n] = k[src, :, :n]
            v[dst, :, :n] = v[src, :, :n]


class SlotView:
    """The cache protocol for one forward: `update(layer_idx, k, v) -> (k_all, v_all)`.

    The write targets are computed once per forward, not per layer: every layer's cache has the same layout, so
    token t of row r lands at the same flat row of `k.view(slots * Hkv * max_len, hd)` in every layer, and one
    `index_copy_` per tensor writes all heads of all new tokens. Built without checks: `SlotKVCache.view` is the
    checked entry point (the engine's compiled decode builds it directly, inside the traced function).
    """

    def __init__(
        self,
        cache: SlotKVCache,
        first_slot: int,
        positions: torch.Tensor,
        kv_len: int,
        lengths: torch.Tensor | None = None,
    ):
        g = cache.geometry
        self.cache = cache
        B, T = positions.shape
        self.lo, self.hi = first_slot, first_slot + B
        self.shape = (B, T)
        # flat row of (slot lo + b, head h, position positions[b, t]) in a [slots * Hkv * max_len, hd] view
        slot_head = (
            torch.arange(B, device=positions.device)[:, None] + first_slot
        ) * g.num_kv_heads + torch.arange(g.num_kv_heads, device=positions.device)[
            None, :
        ]  # [B, Hkv]
        self.index = (slot_head[:, :, None] * g.max_len + positions[:, None, :]).reshape(
            -1
        )  # [B, Hkv, T] → [B*Hkv*T]
        self.kv_len = kv_len
        self.positions = positions  # [B, T]: slot index = position (sliding-window masks read it)
        self.ring = cache.ring  # layer → ring length, read by the model's mask builder
        self._ring_writes = {
            n: self._ring_targets(slot_head, positions, lengths, n)
            for n in set(cache.ring.values())
        }

    @staticmethod
    def _ring_targets(
        slot_head, positions, lengths, n: int
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(which of the B·Hkv·T new rows to write, their flat rows in a [slots * Hkv * n, hd] ring view): every
        token when decoding; in a prefill only each row's last n real positions (distinct ring indices)."""
        T = positions.shape[1]
        rows = slot_head[:, :, None] * n + positions[:, None, :] % n  # [B, Hkv, T]
        if T == 1:  # decoding writes every token (no data-dependent shapes for the compiled step)
            return None, rows.reshape(-1)
        keep = (positions < lengths[:, None]) & (positions >= lengths[:, None] - n)  # [B, T]
        select = keep[:, None, :].expand_as(rows).reshape(-1)  # [B*Hkv*T]
        return select.nonzero().flatten(), rows.reshape(-1)[select]

    def update(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kc, vc = self.cache.k[layer_idx], self.cache.v[layer_idx]
        B, H, T, hd = k.shape
        if self.shape != (B, T) or kc.shape[1] != H or hd != kc.shape[3]:
            raise ValueError(
                f"cache update got k {tuple(k.shape)} for positions {self.shape} "
                f"and cache heads/dim {kc.shape[1]}/{kc.shape[3]}"
            )
        n = self.ring.get(layer_idx)
        if n is not None:
            which, target = self._ring_writes[n]
            k_rows, v_rows = k.reshape(B * H * T, hd), v.reshape(B * H * T, hd)
            if which is not None:
                k_rows, v_rows = k_rows[which], v_rows[which]
            kc.view(-1, hd).index_copy_(0, target, k_rows.to(kc.dtype))
            vc.view(-1, hd).index_copy_(0, target, v_rows.to(vc.dtype))
            if T > 1:  # a prefill from position 0 attends over its own keys
                return k, v
            return kc[self.lo : self.hi, :, : min(self.kv_len, n)], vc[
                self.lo : self.hi, :, : min(self.kv_len, n)
            ]
        # [B, Hkv, T, hd] → [B*Hkv*T, hd] rows in the order of self.index (a view when T == 1)
        kc.view(-1, hd).index_copy_(0, self.index, k.reshape(B * H * T, hd).to(kc.dtype))
        vc.view(-1, hd).index_copy_(0, self.index, v.reshape(B * H * T, hd).to(vc.dtype))
        return kc[self.lo : self.hi, :, : self.kv_len], vc[self.lo : self.hi, :, : self.kv_len]
