"""The slot cache's storage and attention path: packed grouped-query attention equals transformers'
own SDPA, reads copy nothing, and the work asked for (diagnostics levels) changes no token."""

import re

import pytest
import torch
import transformers
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from qstar_cli.engine import cpu_linears
from qstar_cli.engine.cpu_linears import prepack_linears
from qstar_cli.engine.slots import SLOT_ATTENTION, SlotCache, slot_attention, use_slot_attention
from qstar_cli.errors import QstarInputError
from qstar_cli.runfiles.format import PER_TOKEN_FIELDS
from qstar_cli.testing.families import build_family_model, family
from qstar_cli.testing.tiny import build_tiny_model
from tests.helpers import CONVERSATIONS, make_sampler


class _Heads(torch.nn.Module):
    num_key_value_groups = 3


@pytest.mark.parametrize("queries", [1, 5])
def test_packed_grouped_query_attention_equals_repeated_keys(queries):
    gen = torch.Generator().manual_seed(0)
    rows, kv_heads, width, dim = 4, 2, 37, 16
    query = torch.randn(rows, 3 * kv_heads, queries, dim, generator=gen, dtype=torch.float64)
    # Keys as a slot cache holds them: a [:, :, :width] view of longer heads-major storage.
    key, value = (torch.randn(rows, kv_heads, 64, dim, generator=gen, dtype=torch.float64)[:, :, :width] for _ in range(2))
    hidden = torch.rand(rows, 1, queries, width, generator=gen) < 0.3
    hidden[..., 0] = False  # every query sees a column
    mask = torch.zeros(hidden.shape, dtype=torch.float64).masked_fill_(hidden, torch.finfo(torch.float64).min)
    packed, _ = slot_attention(_Heads(), query, key, value, mask, scaling=0.25, dropout=0.0)
    repeated, _ = sdpa_attention_forward(_Heads(), query, key, value, mask, scaling=0.25, dropout=0.0)
    assert packed.shape == repeated.shape == (rows, queries, 3 * kv_heads, dim)
    torch.testing.assert_close(packed, repeated, rtol=0, atol=1e-12)


def test_forwards_read_the_storage_in_place_and_attention_reads_the_masks(tiny_tokenizer):
    """SDPA models switch to the slot attention, eager ones stay; a model on a kernel that would not
    read the 4D masks (flex attention here) switches to the slot attention, or eager without SDPA."""
    model = build_tiny_model(tiny_tokenizer, seed=1)
    use_slot_attention(model)
    assert model.config._attn_implementation == SLOT_ATTENTION
    eager = build_tiny_model(tiny_tokenizer, seed=1)
    eager.set_attn_implementation("eager")
    use_slot_attention(eager)
    assert eager.config._attn_implementation == "eager"
    for key, expected in (("llama", SLOT_ATTENTION), ("gemma2", "eager")):
        flex = build_family_model(family(key), tiny_tokenizer, attn_implementation="flex_attention")
        use_slot_attention(flex)
        assert flex.config._attn_implementation == expected, key

    cache = SlotCache(model.config, slots=3, capacity=40)
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    cache.forward(model, ids, torch.tensor([[0, 1, 2], [-1, 0, 1]]), start=1, longest=3, vocab=50)
    layer = cache.layers[0]
    new = torch.ones(2, layer.keys.shape[1], 3, layer.keys.shape[-1])  # the same rows and queries again
    keys, _ = layer.update(new, new)
    assert keys.untyped_storage().data_ptr() == layer.keys.untyped_storage().data_ptr(), "a view, not a copy"
    assert keys.stride()[-2:] == (layer.keys.shape[-1], 1), "each head's columns contiguous, as SDPA takes them"
    assert layer.keys[0].abs().sum() == 0, "slot 0 untouched by a forward on slots 1 and 2"


@pytest.mark.parametrize("key", ["llama", "gemma3_text"])
def test_bucketed_forwards_pad_rows_and_width_and_change_nothing(tiny_tokenizer, key, monkeypatch):
    """CUDA graphs' bucketed shapes (rows and width padded to buckets, the padding rows at
    position -1 in free slots): the same log-probs as the exact shapes, and no valid column written;
    for a model whose layers all attend fully, and for one with sliding windows of 8 on 2 of 3."""
    model = build_family_model(family(key), tiny_tokenizer, seed=1)
    use_slot_attention(model)
    # Linears that compute each row alike whatever the batch (sgemm's rounding moves with the row count).
    monkeypatch.setattr(cpu_linears, "MIN_PACKED_ELEMENTS", 0)
    prepack_linears(model)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, 50, (3, 9), generator=gen)
    positions = torch.arange(9).expand(3, 9).clone()
    positions[2, :2] = -1  # a left-padded row
    logps, caches = [], []
    for bucketed in (False, True):
        cache = SlotCache(model.config, slots=8, capacity=40, bucketed=bucketed)
        with torch.inference_mode():  # as the sampler runs them: on the packed linears
            cache.forward(model, prompt, positions, 0, 9, 50)
            steps = []
            for step in range(3):
                ids = torch.randint(1, 50, (3, 2), generator=torch.Generator().manual_seed(step))
                at = positions[:, -1:] + 1 + 2 * step + torch.arange(2)
                steps.append(cache.forward(model, ids, at, 0, int(at.max()) + 1, 50, every_query=True, run=model))
        logps.append(torch.stack(steps))
        caches.append(cache)
    assert caches[1].rows == (0, 4) and caches[1].width == 64, "3 rows run as 4, width 15 as 64"
    torch.testing.assert_close(logps[1], logps[0], rtol=1e-6, atol=1e-6)  # wider attention sums in another order
    for exact, padded in zip(caches[0].layers, caches[1].layers):
        torch.testing.assert_close(padded.keys[:3, :, :-1], exact.keys[:3, :, :-1], rtol=0, atol=1e-6)
        assert padded.keys[3:, :, :-1].abs().sum() == 0, "padding rows write their scratch column only"


@pytest.mark.parametrize(
    "rows, longest, expected",
    [
        (1, 1, (1, 64)),
        (3, 65, (4, 128)),
        (16, 256, (16, 256)),
        (17, 257, (32, 512)),
        (33, 769, (48, 1024)),
        (257, 1025, (272, 1280)),
        (299, 2049, (300, 2304)),
    ],
)
def test_bucket_edges(tiny_tokenizer, rows, longest, expected):
    """Rows round up to powers of two up to 16, then to multiples of 16; widths to powers of two from
    64 up to 256, then to multiples of 256; neither past the free slots or the capacity."""
    model = build_tiny_model(tiny_tokenizer, seed=1, hidden_size=16, num_layers=1)
    cache = SlotCache(model.config, slots=300, capacity=2304, bucketed=True)
    seen = []

    def run(input_ids, attention_mask, **kwargs):
        seen.append((len(input_ids), attention_mask.shape[-1]))
        return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    ids = torch.ones(rows, 1, dtype=torch.long)
    cache.forward(model, ids, torch.full((rows, 1), longest - 1), 0, longest, 50, run=run)
    assert seen == [expected]


@pytest.mark.parametrize("draft_k", [0, 2])
def test_diagnostics_none_draws_the_same_tokens_and_keeps_only_their_ids(pair, draft_k):
    sampler = make_sampler(pair, max_new_tokens=10, draft_k=draft_k)
    full = sampler.generate(CONVERSATIONS)
    bare = sampler.generate(CONVERSATIONS, diagnostics="none")
    for a, b in zip(full, bare):
        assert (b.token_ids, b.finish_reason, b.text) == (a.token_ids, a.finish_reason, a.text)
        assert list(b.per_token) == ["token_id"] and b.per_token["token_id"] == a.token_ids
        assert list(a.per_token) == list(PER_TOKEN_FIELDS)
        assert b.round_tokens == a.round_tokens


@pytest.mark.parametrize("module, version", [(transformers, "5.3.0"), (torch, "2.6.0+cu124")])
def test_versions_below_the_tested_floors_are_refused_by_name(pair, module, version, monkeypatch):
    """transformers before the ``cache=`` keyword would drop the cache silently; older torch may not
    reinplace the compiled cache write."""
    monkeypatch.setattr(module, "__version__", version)
    with pytest.raises(QstarInputError, match=rf"needs {module.__name__} >= \d+\.\d+, found {re.escape(version)}"):
        make_sampler(pair)
