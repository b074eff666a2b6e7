"""Which models the slot cache serves exactly, decided from a model's config before any weight loads.

Each layer of a transformers decoder attends in a way its config declares (``layer_types``; without
it, ``sliding_window`` or ``attention_chunk_size`` make every layer slide or chunk, as transformers'
own cache and mask code read them):

* ``full_attention``: every position up to the query's own;
* ``sliding_attention``: the last ``sliding_window`` positions, the query's own included;
* ``chunked_attention``: the positions up to the query's own in its chunk of ``attention_chunk_size``.

:class:`~qstar_cli.engine.slots.SlotCache` builds each of these masks from every query's position
in its own slot and hands a model with several kinds of layer the mapping by layer type that its
forward takes. Whatever else a layer does inside its attention (attention sinks, soft caps, query
scalars, latent keys and values of other head sizes, MoE blocks) is the model's own code, which the
slot cache leaves as it is.

Refused, in one line naming the model type and what it has:

* layers that keep a recurrent or convolutional state instead of (or beside) keys and values
  (linear attention, Mamba, short convolutions): a slot of keys and values cannot hold such a state,
  nor roll it back past a rejected draft;
* layers that reuse another layer's keys and values (``kv_sharing_modes``);
* a layer type this qstar does not know (a new attention pattern: refused rather than guessed);
* a model whose class does not run its attention through transformers' attention interface (the
  masks and the cache would not reach it), or that no causal-LM class of transformers takes;
* a model whose layers attend both ways (``is_causal: false``, ``use_bidirectional_attention``, an
  encoder's config such as BERT's or RoBERTa's), which a token-by-token cache cannot reproduce;
* a model that computes a layer's values from the cache's length, one offset for the whole batch
  (Llama 4's ``attn_temperature_tuning`` on its layers without rotary embeddings), while each of
  qstar's slots holds its row at its own positions;
* a model whose config declares a window its attention code never applies.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from qstar_cli.errors import QstarInputError

#: The layer types whose masks the slot cache builds.
MASKED_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
#: Layer types without attention (an MLP or MoE block alone): they read no keys and values.
NO_ATTENTION_TYPES = ("moe", "mlp")
#: Layer types that keep a state instead of (or beside) keys and values, and what it is.
STATEFUL_TYPES = {
    "linear_attention": "a recurrent state (linear attention or Mamba)",
    "conv": "a convolutional state (short convolutions)",
    "hybrid": "a recurrent state (Mamba beside attention)",
    "hybrid_sliding": "a recurrent state (Mamba beside sliding-window attention)",
}


class UnsupportedModelError(QstarInputError):
    """A model whose layers the slot cache cannot serve exactly; ``reason`` says what it has, in a few words."""

    def __init__(self, who: str, reason: str, detail: str):
        super().__init__(f"{who} {reason}{detail}; see Model families in qstar's docs")
        self.reason = reason


@dataclass(frozen=True)
class AttentionLayout:
    """What each layer of a model attends to: its type, and the window or chunk of the typed layers."""

    model_type: str
    layer_types: tuple[str, ...]
    sliding_window: int | None = None
    chunk_size: int | None = None

    @property
    def mask_types(self) -> tuple[str, ...]:
        """The distinct attention types, in the order of the layers that first have them."""
        return tuple(dict.fromkeys(t for t in self.layer_types if t in MASKED_TYPES))

    def describe(self) -> str:
        """``full``, ``sliding window 8``, ``sliding window 8 (2 of 3 layers), full``..."""
        counts, layers = Counter(self.layer_types), len(self.layer_types)
        words = {"full_attention": "full", "sliding_attention": f"sliding window {self.sliding_window}",
                 "chunked_attention": f"chunks of {self.chunk_size}"}  # fmt: skip
        parts = [words[t] + (f" ({counts[t]} of {layers} layers)" if counts[t] < layers else "") for t in self.mask_types]
        return ", ".join(parts)


def attention_layout(config: Any, name: str | None = None) -> AttentionLayout:
    """The layout of a model of ``config`` (a transformers config), or :class:`UnsupportedModelError`
    naming ``name`` (the model as the user gave it), its model type and what it has."""
    text = config.get_text_config(decoder=True)
    model_type = getattr(text, "model_type", None) or getattr(config, "model_type", "?")
    who = _named(name, model_type)
    types = _layer_types(text)
    counts = Counter(types)
    for layer_type, what in STATEFUL_TYPES.items():
        if layer_type in counts:
            raise UnsupportedModelError(
                who, f"keeps {_state_of(text, what)}", f" in {counts[layer_type]} of its {len(types)} layers: qstar's per-slot KV "
                "cache holds keys and values only and cannot keep or roll back such a state; use a model whose layers all attend",
            )  # fmt: skip
    _check_causal(text, who)
    unknown = sorted(set(types) - set(MASKED_TYPES) - set(NO_ATTENTION_TYPES))
    if unknown:
        raise UnsupportedModelError(
            who, f"has layers of type {', '.join(unknown)}", f", an attention pattern this qstar does not know (it knows "
            f"{', '.join(MASKED_TYPES)}): refused rather than guessed",
        )  # fmt: skip
    try:
        sharing = getattr(text, "kv_sharing_modes", None) or ()
    except ValueError as err:  # transformers checks the sharing on reading it
        raise UnsupportedModelError(who, "has a key and value sharing that transformers refuses", f": {err}") from None
    if any(mode == "reuse" for mode in sharing):
        raise UnsupportedModelError(
            who, "has layers that reuse another layer's keys and values", ", which qstar's slot cache does not share"
        )
    if not any(t in MASKED_TYPES for t in types):
        raise UnsupportedModelError(who, "has no attention layers", ": qstar's slot cache has nothing to serve")
    sizes = {"sliding_attention": "sliding_window", "chunked_attention": "attention_chunk_size"}
    span = {t: getattr(text, name, None) for t, name in sizes.items() if t in counts}
    for layer_type, value in span.items():
        if not isinstance(value, int) or value < 1:
            raise UnsupportedModelError(who, f"has {layer_type} layers", f" but its config's {sizes[layer_type]} is {value!r}, not a size")
    if getattr(text, "attn_temperature_tuning", False) and 0 in (getattr(text, "no_rope_layers", None) or ()):
        raise UnsupportedModelError(
            who, "scales queries by their position counted from the cache's length", " on its layers without rotary embeddings "
            "(attn_temperature_tuning), one offset for the whole batch, while qstar's slots hold each row at its own positions",
        )  # fmt: skip
    return AttentionLayout(model_type, tuple(types), span.get("sliding_attention"), span.get("chunked_attention"))


def _state_of(text_config: Any, what: str) -> str:
    """What state a model's layers keep, named after its config's fields where they say (Mamba, linear attention)."""
    fields = set(text_config.to_dict())
    if what.startswith("a recurrent state") and any(f.startswith("mamba") for f in fields):
        return "a recurrent state (Mamba)" if "beside" not in what else what
    if what.startswith("a recurrent state") and any(f.startswith("linear_") for f in fields):
        return "a recurrent state (linear attention)"
    return what


def _check_causal(text_config: Any, who: str) -> None:
    """Refuse a model whose layers attend both ways: a cache of earlier tokens reproduces a causal one only."""
    both_ways = (
        "declares non-causal attention (is_causal: false)" if getattr(text_config, "is_causal", True) is False else
        "attends both ways (use_bidirectional_attention)" if getattr(text_config, "use_bidirectional_attention", False) else
        "is an encoder's architecture (BERT-style)" if hasattr(text_config, "is_decoder") and hasattr(text_config, "add_cross_attention") else None
    )  # fmt: skip
    if both_ways:
        raise UnsupportedModelError(
            who, both_ways, ": its layers see later tokens too (or number positions their own way), which a token-by-token "
            "cache of earlier tokens cannot reproduce; use a decoder-only causal LM",
        )  # fmt: skip


def _named(name: str | None, model_type: str) -> str:
    return f"{name} ({model_type})" if name else model_type


def _layer_types(text_config: Any) -> list[str]:
    """Each layer's type, as transformers' cache reads a config: ``layer_types``, else every layer
    sliding with a ``sliding_window``, chunked with an ``attention_chunk_size``, or full."""
    declared = getattr(text_config, "layer_types", None)
    if declared is not None:
        return list(declared)
    if getattr(text_config, "sliding_window", None) is not None:
        kind = "sliding_attention"
    elif getattr(text_config, "attention_chunk_size", None) is not None:
        kind = "chunked_attention"
    else:
        kind = "full_attention"
    return [kind] * text_config.num_hidden_layers


def check_architecture(config: Any, name: str | None = None, model_class: type | None = None) -> AttentionLayout:
    """:func:`attention_layout`, and refuse a model class that computes attention its own way: the slot
    cache's masks and storage reach a model through transformers' attention interface.
    ``model_class`` is the loaded model's class; before loading, the class transformers' causal-LM
    mapping gives the config (a config none takes is left to the loader, whose message says so)."""
    layout = attention_layout(config, name)
    who = _named(name, layout.model_type)
    if model_class is None:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        try:
            model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
        except (KeyError, ValueError):
            raise UnsupportedModelError(
                who, "is not a causal LM", f" that transformers' AutoModelForCausalLM loads ({type(config).__name__})"
            ) from None
    builds = _mask_builders(model_class)
    for layer_type, builder in (
        ("sliding_attention", "create_sliding_window_causal_mask"),
        ("chunked_attention", "create_chunked_causal_mask"),
    ):
        if layer_type in layout.mask_types and builds is not None and builder not in builds:
            raise UnsupportedModelError(
                who, f"declares {layer_type} layers that its attention code never applies", f" ({model_class.__name__} builds no "
                f"{builder.removeprefix('create_').replace('_', ' ')}): refused rather than guessed",
            )  # fmt: skip
    if not getattr(model_class, "_supports_attention_backend", False):
        raise UnsupportedModelError(
            who, "computes its attention outside transformers' attention interface",
            f" ({model_class.__name__}), which qstar's slot cache needs to give each layer its keys, values and mask",
        )  # fmt: skip
    return layout


def _mask_builders(model_class: type) -> set[str] | None:
    """The names of transformers' mask builders that ``model_class``'s modeling module uses (None for
    a class outside transformers' own modeling modules, which are not read)."""
    import sys

    module = sys.modules.get(model_class.__module__)
    if module is None or not model_class.__module__.startswith("transformers.models."):
        return None
    return {name for name in vars(module) if name.startswith("create_") and name.endswith("_mask")}
