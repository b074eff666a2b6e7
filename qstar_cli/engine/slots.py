"""Per-slot KV storage: each model's keys and values preallocated per slot, written in place.

A :class:`SlotCache` holds, for every layer, keys and values stored as ``[slots, capacity, kv_heads,
head_dim]`` (read as ``[slots, kv_heads, capacity, head_dim]`` views). Slot ``r`` keeps its sequence's token at position ``p`` in column ``p``, so a row is
written at its own position with no per-step copy of the cache, a finished row's slot is reused by
overwriting it, and a row is rolled back by lowering its length (the columns past it are masked out
and overwritten later). The attention mask needs no history: a query at position ``p`` sees exactly
the columns ``0..p`` of its own slot, which :meth:`SlotCache.forward` passes as a 4D boolean mask
(transformers uses a 4D mask as is).

A forward reads the columns up to the longest sequence among its rows (rounded up to
:data:`WIDTH_STEP`), so attention costs what the batch needs. The capacity grows in chunks of
:data:`CAPACITY_CHUNK` columns when a longer sequence arrives (one copy of the storage); memory is
``2 x layers x slots x capacity x kv_heads x head_dim`` elements per model, with capacity the longest
prompt + token budget seen so far, rounded up.

Rows taking part in a forward are always the leading slots ``[start, stop)``: the sampler keeps the
running rows packed at the front (:meth:`SlotCache.move` copies one row into a freed slot) and
prefills newcomers into the slots right after them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

#: Capacity is a multiple of this many columns (growth is rare).
CAPACITY_CHUNK = 256
#: Columns a forward reads are a multiple of this (fewer distinct shapes for the kernels).
WIDTH_STEP = 64


class SlotLayer(CacheLayerMixin):
    """One layer's keys and values for every slot; ``update`` writes at the columns the cache names."""

    is_compileable = False
    is_sliding = False

    def __init__(self, cache: SlotCache):
        super().__init__()
        self.cache = cache
        self.keys: Tensor | None = None
        self.values: Tensor | None = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        slots, capacity = self.cache.slots, self.cache.capacity
        # Slot and position adjacent, so that a write is one index_copy_ over (slot, position) rows.
        self.keys = key_states.new_zeros((slots, capacity, key_states.shape[1], key_states.shape[-1]))
        self.values = value_states.new_zeros((slots, capacity, value_states.shape[1], value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        index = self.cache.write_index
        for store, new in ((self.keys, key_states), (self.values, value_states)):
            store.view(-1, *store.shape[2:]).index_copy_(0, index, new.transpose(1, 2).reshape(-1, *store.shape[2:]))
        start, stop = self.cache.rows
        width = self.cache.width
        return self.keys[start:stop, :width].transpose(1, 2), self.values[start:stop, :width].transpose(1, 2)

    def grow(self, capacity: int) -> None:
        if self.is_initialized:
            pad = capacity - self.keys.shape[1]
            self.keys = torch.nn.functional.pad(self.keys, (0, 0, 0, 0, 0, pad))
            self.values = torch.nn.functional.pad(self.values, (0, 0, 0, 0, 0, pad))

    def move(self, src: int, dst: int, length: int) -> None:
        if self.is_initialized:
            self.keys[dst, :length] = self.keys[src, :length]
            self.values[dst, :length] = self.values[src, :length]

    def get_seq_length(self) -> int:
        return self.cache.width

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.width, 0

    def get_max_length(self) -> int:
        return self.cache.capacity


class SlotCache(Cache):
    """KV storage for ``slots`` sequences of one model, each written at its own positions.

    >>> cache = SlotCache(model.config, slots=8, capacity=1024)
    >>> logp = cache.forward(model, ids, positions, start=0)   # ids, positions: [rows, q]
    """

    def __init__(self, config, slots: int, capacity: int):
        self.slots = slots
        self.capacity = _round_up(max(capacity, 1))
        self.rows = (0, 0)
        self.width = 0
        self.write_index: Tensor | None = None
        super().__init__(layers=[SlotLayer(self) for _ in range(config.num_hidden_layers)])

    def ensure_capacity(self, length: int) -> None:
        """Make room for sequences of ``length`` tokens (plus the scratch column)."""
        if length + 1 > self.capacity:
            self.capacity = _round_up(length + 1)
            for layer in self.layers:
                layer.grow(self.capacity)

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` columns of slot ``src`` into slot ``dst``."""
        for layer in self.layers:
            layer.move(src, dst, length)

    def forward(
        self, model, ids: Tensor, positions: Tensor, start: int, longest: int, vocab: int, every_query: bool = False
    ) -> Tensor:
        """Run ``model`` on slots ``start .. start + len(ids)``; float32 log-probs after each row's last
        query (``[rows, vocab]``), or after every query (``[rows, q, vocab]``) with ``every_query``.

        ``ids`` and ``positions`` are ``[rows, q]``; a position of ``-1`` marks padding (left-padded
        prompts, or the queries past a row's drafts), which writes to the scratch column (the last
        one, never seen as valid) and whose output is meaningless. ``longest`` is at least the
        largest position + 1 among the rows (known on the host, so no sync).
        """
        n, q = ids.shape
        self.rows = (start, start + n)
        self.width = min(WIDTH_STEP * math.ceil(longest / WIDTH_STEP), self.capacity)
        pad = positions < 0
        columns = torch.where(pad, self.capacity - 1, positions)
        # Flat (slot, column) row of each query's key and value in the [slots * capacity, ...] storage.
        slots = torch.arange(start, start + n, device=ids.device).unsqueeze(-1)
        self.write_index = (slots * self.capacity + columns).reshape(-1)
        # A query at position p sees columns 0..p of its own slot; padding queries see column 0 only.
        seen = torch.where(pad, 0, positions)
        mask = torch.arange(self.width, device=ids.device) <= seen.unsqueeze(-1)
        out = model(
            input_ids=ids,
            attention_mask=mask.unsqueeze(1),
            position_ids=seen,
            cache=self,
            use_cache=True,
            logits_to_keep=q if every_query else 1,
        )
        # Embedding rows past the shared vocabulary (padding) get probability zero.
        logits = out.logits[..., :vocab] if every_query else out.logits[:, -1, :vocab]
        return logits.float().log_softmax(-1)


def _round_up(length: int) -> int:
    return CAPACITY_CHUNK * math.ceil(length / CAPACITY_CHUNK)
