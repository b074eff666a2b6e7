"""Per-slot KV storage: each model's keys and values preallocated per slot, written in place.

A :class:`SlotCache` holds, for every layer, keys and values stored heads-major as ``[slots,
kv_heads, capacity, head_dim]``, the layout the attention kernels take: a forward's rows read
``[start:stop, :, :width]``, a view whose rows are contiguous, so attention copies nothing. Slot
``r`` keeps its sequence's token at position ``p`` in column ``p``, so a row is written at its own
position with no per-step copy of the cache (``DynamicCache`` concatenates its whole history every
step), a finished row's slot is reused by overwriting it, and a row is rolled back by lowering its
length (the columns past it are masked out and overwritten later). The attention mask needs no
history: a query at position ``p`` sees the columns of its own slot that its layer's attention type
sees (``0..p``; the last ``sliding_window`` of them for a sliding layer: :func:`attention_masks`),
which :meth:`SlotCache.forward` passes as 4D additive masks, one per attention type the model
declares (:mod:`~qstar_cli.engine.architectures`; transformers uses a 4D mask as is).

A forward reads the columns up to the longest sequence among its rows (rounded up to
:data:`WIDTH_STEP`), so attention costs what the batch needs. The capacity grows in chunks of
:data:`CAPACITY_CHUNK` columns when a longer sequence arrives (one copy of the storage); memory is
``2 x layers x slots x capacity x kv_heads x head_dim`` elements per model, with capacity the longest
prompt + token budget seen so far, rounded up.

Grouped-query models attend through :func:`slot_attention`, which packs each key/value head's
query heads into one query block instead of repeating the keys and values per query head.

Rows taking part in a forward are always the leading slots ``[start, stop)``: the sampler keeps the
running rows packed at the front (:meth:`SlotCache.move` copies one row into a freed slot) and
prefills newcomers into the slots right after them.
"""

from __future__ import annotations

import math
import re

import torch
import transformers
from torch import Tensor
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from qstar_cli.engine.architectures import AttentionLayout, attention_layout
from qstar_cli.errors import QstarInputError

#: Capacity is a multiple of this many columns (growth is rare).
CAPACITY_CHUNK = 256
#: Columns a forward reads are a multiple of this (fewer distinct shapes for the kernels).
WIDTH_STEP = 8
#: Longest query block packed per key/value head (decode and verify forwards; a prefill's long
#: blocks would need a mask per packed query larger than the repeated keys).
MAX_PACKED_QUERIES = 64
#: The attention implementation :func:`use_slot_attention` gives a model.
SLOT_ATTENTION = "qstar_slot_sdpa"
#: Bucketed forwards (CUDA graphs: one graph per shape) take rows rounded up to a power of two up to
#: ROW_BUCKET, then to a multiple of it (257 rows run 272, not 512), and attention widths rounded up
#: to a power of two from MIN_BUCKET_WIDTH up to WIDTH_BUCKET, then to a multiple of it (1,025
#: columns attend over 1,280, not 2,048; the capacity is such a multiple): at most
#: ``5 + slots / 16`` row counts and ``3 + capacity / 256`` widths per query count, of which a run
#: records those it reaches.
ROW_BUCKET = 16
WIDTH_BUCKET = 256
MIN_BUCKET_WIDTH = 64


def bucket(n: int, step: int, least: int = 1) -> int:
    """``n`` (at least ``least``) rounded up to a power of two up to ``step``, beyond it to a multiple of ``step``."""
    n = max(n, least)
    return 1 << (n - 1).bit_length() if n <= step else step * math.ceil(n / step)


#: The oldest versions the slot cache is tested with (pyproject.toml's floors). Older transformers
#: take the cache as ``past_key_values=``: the ``cache=`` it is passed would land in ``**kwargs`` and
#: every forward would silently see no history. Older torch may not reinplace the compiled cache
#: write (an ``index_copy_`` through a flat view), which would then write a copy, not the cache.
MIN_VERSIONS = {"torch": (2, 13), "transformers": (5, 24)}


def check_versions() -> None:
    """Refuse, with the versions named, a torch or transformers older than :data:`MIN_VERSIONS`."""
    for module in (torch, transformers):
        floor = MIN_VERSIONS[module.__name__]
        found = re.match(r"(\d+)\.(\d+)", module.__version__)
        if found is None or tuple(map(int, found.groups())) < floor:
            raise QstarInputError(
                f"qstar needs {module.__name__} >= {'.'.join(map(str, floor))}, found {module.__version__}: "
                f"pip install -U '{module.__name__}>={'.'.join(map(str, floor))}'"
            )


def slot_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs) -> tuple[Tensor, None]:
    """transformers' SDPA attention, except that with grouped-query heads and a mask shared by all
    heads the ``groups`` query heads of each key/value head are packed into one block of
    ``groups x q`` queries (as transformers does for a single query), so that the keys and values are
    read in place rather than repeated per query head (``repeat_kv`` copies them per layer)."""
    groups = getattr(module, "num_key_value_groups", 1)
    n, heads, q, dim = query.shape
    if groups == 1 or attention_mask is None or attention_mask.shape[1] != 1 or groups * q > MAX_PACKED_QUERIES:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    # Query head h = kv * groups + g reads key/value head kv; packed row g * q + t sees query t's mask.
    packed = query.reshape(n, heads // groups, groups * q, dim)
    mask = attention_mask.repeat(1, 1, groups, 1) if q > 1 else attention_mask
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=mask, scale=kwargs.get("scaling"))
    return out.reshape(n, heads, q, dim).transpose(1, 2), None


AttentionInterface.register(SLOT_ATTENTION, slot_attention)
AttentionMaskInterface.register(SLOT_ATTENTION, sdpa_mask)


def use_slot_attention(model) -> None:
    """Give a model :func:`slot_attention` (transformers' SDPA attention: the same results, for any
    cache) where it takes SDPA, else eager attention; a model on eager attention stays there. Other
    implementations (flash and flex kernels) would not read the slot cache's 4D masks: a model
    loaded on one is switched to these."""
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation not in ("eager", SLOT_ATTENTION):
        model.set_attn_implementation(SLOT_ATTENTION if implementation == "sdpa" or model._supports_sdpa else "eager")


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
        shape = (self.cache.slots, key_states.shape[1], self.cache.capacity)
        self.keys = key_states.new_zeros((*shape, key_states.shape[-1]))
        self.values = value_states.new_zeros((*shape, value_states.shape[-1]))
        self.is_initialized = True
        self._mark_static()

    def _mark_static(self) -> None:
        # Key/value heads and head_dim are the model's constants: dynamic, they would share a symbol
        # with any size equal to them (the warm-up's rows, say) and pin it when the attention
        # specialises them, so that the run's other sizes recompile the forward.
        if self.cache.compiled:
            for store in (self.keys, self.values):
                torch._dynamo.mark_static(store, 1)
                torch._dynamo.mark_static(store, 3)
        # CUDA graphs replay the writes into the storage in place only at addresses they may keep.
        if self.cache.bucketed:
            torch._dynamo.mark_static_address(self.keys)
            torch._dynamo.mark_static_address(self.values)

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        index = self.cache.write_index(key_states.shape[1])
        for store, new in ((self.keys, key_states), (self.values, value_states)):
            store.view(-1, store.shape[-1]).index_copy_(0, index, new.reshape(-1, new.shape[-1]))
        start, stop = self.cache.rows
        width = self.cache.width
        return self.keys[start:stop, :, :width], self.values[start:stop, :, :width]

    def grow(self, capacity: int) -> None:
        if self.is_initialized:
            pad = capacity - self.keys.shape[2]
            self.keys = torch.nn.functional.pad(self.keys, (0, 0, 0, pad))
            self.values = torch.nn.functional.pad(self.values, (0, 0, 0, pad))
            self._mark_static()

    def move(self, src: int, dst: int, length: int) -> None:
        if self.is_initialized:
            self.keys[dst, :, :length] = self.keys[src, :, :length]
            self.values[dst, :, :length] = self.values[src, :, :length]

    def get_seq_length(self) -> int:
        return self.cache.width

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.width, 0

    def get_max_length(self) -> int:
        return self.cache.capacity


class SlotCache(Cache):
    """KV storage for ``slots`` sequences of one model, each written at its own positions.

    >>> cache = SlotCache(model.config, slots=8, capacity=1024)
    >>> ids, positions = torch.tensor([[5, 6, 7]]), torch.tensor([[0, 1, 2]])   # [rows, q]: slot 0's first 3 tokens
    >>> logp = cache.forward(model, ids, positions, start=0, longest=3, vocab=model.config.vocab_size)   # [rows, vocab]
    """

    def __init__(self, config, slots: int, capacity: int, compiled: bool = False, bucketed: bool = False):
        self.slots = slots
        #: Forwards go through a compiled function (``run``), which specialises on the storage.
        self.compiled = compiled or bucketed
        #: Compiled forwards (``run``) take bucketed shapes: rows and width padded (:func:`bucket`).
        self.bucketed = bucketed
        self.capacity = round_capacity(max(capacity, 1))
        self.rows = (0, 0)
        self.width = 0
        self.columns: Tensor | None = None
        self._write_index: dict[int, Tensor] = {}
        #: What each layer attends to (refused here if the slots cannot serve the model exactly).
        self.layout = attention_layout(config)
        super().__init__(layers=[SlotLayer(self) for _ in self.layout.layer_types])

    def ensure_capacity(self, length: int) -> None:
        """Make room for sequences of ``length`` tokens (plus the scratch column)."""
        if length + 1 > self.capacity:
            self.capacity = round_capacity(length + 1)
            for layer in self.layers:
                layer.grow(self.capacity)

    def write_index(self, heads: int) -> Tensor:
        """Row of each new key and value (``[rows, heads, q]``, flattened) in a layer's storage seen as
        ``[slots * heads * capacity, head_dim]``: one ``index_copy_`` writes a forward's columns.
        Built once per forward, shared by every layer."""
        if heads not in self._write_index:
            start, stop = self.rows
            slots = torch.arange(start, stop, device=self.columns.device)[:, None, None]
            heads_of = torch.arange(heads, device=self.columns.device)[None, :, None]
            self._write_index[heads] = ((slots * heads + heads_of) * self.capacity + self.columns[:, None, :]).flatten()
        return self._write_index[heads]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` columns of slot ``src`` into slot ``dst``."""
        for layer in self.layers:
            layer.move(src, dst, length)

    def forward(
        self, model, ids: Tensor, positions: Tensor, start: int, longest: int, vocab: int, every_query: bool = False, run=None
    ) -> Tensor:
        """Run ``model`` on slots ``start .. start + len(ids)``; float32 log-probs after each row's last
        query (``[rows, vocab]``), or after every query (``[rows, q, vocab]``) with ``every_query``.

        ``ids`` and ``positions`` are ``[rows, q]``; a position of ``-1`` marks padding (left-padded
        prompts, or the queries past a row's drafts), which writes to the scratch column (the last
        one, never seen as valid) and whose output is meaningless. ``longest`` is at least the
        largest position + 1 among the rows (known on the host, so no sync). ``run`` is called
        instead of the model (its compiled forward, :func:`~qstar_cli.engine.compiled.compiled_forward`);
        on a bucketed cache it gets padding rows (the free slots after these, at position -1) and a
        width rounded up by :func:`bucket` (rows by :data:`ROW_BUCKET`, width by :data:`WIDTH_BUCKET`).
        """
        n, q = ids.shape
        if run is not None:
            # New tensors, not views: a compiled forward would be specialised on each view's base.
            rows = min(bucket(n, ROW_BUCKET), self.slots - start) if self.bucketed else n
            ids = torch.cat([ids, ids.new_zeros(rows - n, q)])
            positions = torch.cat([positions, positions.new_full((rows - n, q), -1)])
        if run is not None and self.bucketed:
            longest = bucket(longest, WIDTH_BUCKET, MIN_BUCKET_WIDTH)
            torch.compiler.cudagraph_mark_step_begin()
        self.rows = (start, start + len(ids))
        self.width = min(WIDTH_STEP * math.ceil(longest / WIDTH_STEP), self.capacity)
        pad = positions < 0
        self.columns = torch.where(pad, self.capacity - 1, positions)
        self._write_index.clear()
        # A padding query sees column 0 only.
        seen = torch.where(pad, 0, positions)
        out = (run or model)(
            input_ids=ids,
            attention_mask=attention_masks(self.layout, seen, self.width, model.dtype),
            position_ids=seen,
            cache=self,
            use_cache=True,
            logits_to_keep=q if every_query else 1,
        )
        # Embedding rows past the shared vocabulary (padding) get probability zero.
        logits = out.logits[:n, :, :vocab] if every_query else out.logits[:n, -1, :vocab]
        return logits.float().log_softmax(-1)


def attention_masks(layout: AttentionLayout, seen: Tensor, width: int, dtype: torch.dtype) -> Tensor | dict[str, Tensor]:
    """The additive masks ``[rows, 1, q, width]`` of queries at positions ``seen`` ``[rows, q]`` over
    their own slots' first ``width`` columns, one per attention type of ``layout``: a query at
    position ``p`` sees columns ``0..p`` (full), ``p - window + 1..p`` (sliding, as transformers'
    ``sliding_window_overlay``), or ``0..p`` within its chunk (chunked). One mask, or a mapping by
    layer type for a model with several (transformers' mixed-layer models take either). Additive (0
    or the dtype's min) rather than boolean: the kernels would convert it per layer."""
    columns = torch.arange(width, device=seen.device)
    seen = seen.unsqueeze(-1)
    future = columns > seen
    masks = {}
    for layer_type in layout.mask_types:
        if layer_type == "sliding_attention":
            hidden = future | (columns <= seen - layout.sliding_window)
        elif layer_type == "chunked_attention":
            hidden = future | (columns < seen - seen % layout.chunk_size)
        else:
            hidden = future
        masks[layer_type] = (
            torch.zeros(hidden.shape, dtype=dtype, device=seen.device).masked_fill_(hidden, torch.finfo(dtype).min).unsqueeze(1)
        )
    return masks if len(masks) > 1 else masks[layout.mask_types[0]]


def round_capacity(length: int) -> int:
    """The capacity (a multiple of :data:`CAPACITY_CHUNK` columns) that holds ``length`` columns."""
    return CAPACITY_CHUNK * math.ceil(length / CAPACITY_CHUNK)
