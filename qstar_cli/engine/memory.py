"""How many slots fit: ``--batch-size auto``.

Each slot holds, for every model, keys and values for the longest sequence the schedule needs
(:class:`~qstar_cli.engine.slots.SlotCache` sizes them so), and a round's working memory: float32
log-probs and the mixture's temporaries over the vocabulary for each of its ``draft_k + 1`` queries.
The slots are what ``memory_fraction`` of the memory still free once the models are loaded holds
(CUDA: ``mem_get_info``; CPU: the kernel's available memory), so weights are counted as loaded,
less the working memory of one prefill forward: prefills run in chunks of at most
:data:`PREFILL_CHUNK_TOKENS` tokens (:func:`prefill_chunk`), whose activations, grouped-query keys and
values repeated per query head, and attention mask :func:`prefill_reserve` counts.
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qstar_cli.errors import QstarInputError

#: Float32 ``[vocab]`` rows a round keeps per query of a slot (both models' log-probs, q, the
#: sampling distribution, the solver's moments and temporaries, the diagnostics'), rounded up.
WORKING_ROWS = 16
GIB = 1 << 30
#: Tokens (rows x columns) one prefill forward takes at most: an eager forward's temporaries grow
#: with its tokens (an 8B model's by ~175 KB each), so a prefill of many long prompts is split.
PREFILL_CHUNK_TOKENS = 2048

#: ``mallopt`` parameters (glibc's malloc.h) and the freed host memory the heap keeps for reuse.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
HOST_HEAP_KEEP = GIB


@functools.cache
def keep_freed_host_memory() -> bool:
    """Make glibc's heap keep freed blocks of up to :data:`HOST_HEAP_KEEP` for reuse; False off glibc.

    A round on the CPU allocates and frees tens of MB of temporaries (``[rows, vocab]`` log-probs,
    the solver's moments). By default glibc serves every block above its mmap threshold (at most
    32 MiB, adjusted as blocks come and go) with a fresh ``mmap`` and hands heap tops above twice
    that back to the kernel, so each round page-faults its temporaries in again: at batch 32 on the
    demo pair that was three quarters of the solve's time (benchmarks/RESULTS.md). Fixed thresholds
    of 1 GiB make freed memory stay with the process, the CPU counterpart of CUDA's caching allocator
    (the process's resident memory may stay up to that much above what it uses). Process-wide, so
    set once; the memory that loading the models left free is handed back first.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl, Windows)
        return False
    malloc_trim(0)
    return bool(mallopt(M_MMAP_THRESHOLD, HOST_HEAP_KEEP) and mallopt(M_TRIM_THRESHOLD, HOST_HEAP_KEEP))


def size(n: float) -> str:
    """Bytes in the unit that shows them: ``512 B``, ``3.5 MiB``, ``12.25 GiB``."""
    for unit, scale in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def kv_bytes_per_token(model) -> int:
    """Key and value bytes one token takes in a model's slot cache, as its storage holds them: what
    a one-token forward allocates per column (layers x (key + value heads x head sizes) x dtype
    bytes, whatever the architecture: latent keys and values of other head sizes, layers without
    attention)."""
    from qstar_cli.engine.slots import SlotCache  # slots.py imports transformers' attention stack

    cache = SlotCache(model.config, slots=1, capacity=1)
    token = torch.zeros(1, 1, dtype=torch.long, device=model.device)
    with torch.inference_mode():
        cache.forward(model, token, token, start=0, longest=1, vocab=1)
    return sum(layer.keys[0, :, 0].nbytes + layer.values[0, :, 0].nbytes for layer in cache.layers if layer.is_initialized)


def prefill_chunk(rows: int, width: int, tokens: int = PREFILL_CHUNK_TOKENS) -> tuple[int, int]:
    """``(rows, columns)`` of each forward of a prefill of ``rows`` prompts left-padded to ``width``
    columns: at most ``tokens`` tokens, whole prompts where they fit (as many rows as fit), else
    ``tokens`` columns of one prompt at a time."""
    columns = max(1, min(width, tokens))
    return max(1, min(rows, tokens // columns)), columns


def _shape(model) -> tuple[int, int, int, int, int]:
    """``(hidden, intermediate, heads, kv_heads, head_dim)`` of a model's decoder layers."""
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return config.hidden_size, getattr(config, "intermediate_size", None) or 4 * config.hidden_size, heads, kv_heads, head_dim


def prefill_bytes_per_token(model) -> int:
    """Bytes a prefill forward holds per query token inside a decoder layer: the residual, normed
    and output hidden states, query/key/value and their rotated copies, three MLP-wide tensors
    (gate, up, their product) in the model's dtype, and the norm's two float32 copies."""
    hidden, intermediate, heads, kv_heads, head_dim = _shape(model)
    return model.dtype.itemsize * (4 * hidden + 3 * intermediate + 2 * (heads + 2 * kv_heads) * head_dim) + 2 * 4 * hidden


def prefill_bytes_per_column(model) -> int:
    """Bytes a prefill forward holds per row and attended column: the keys and values repeated per
    query head (transformers' SDPA path repeats them whenever a mask is given)."""
    _, _, heads, _, head_dim = _shape(model)
    return 2 * heads * head_dim * model.dtype.itemsize


def prefill_reserve(model, width: int, tokens: int = PREFILL_CHUNK_TOKENS) -> int:
    """Working memory of the largest prefill forward over prompts of up to ``width`` tokens: its
    chunk's tokens, the columns its rows attend, and its additive mask (with the boolean it is made
    from) per query and column. Its logits (a vocabulary row per prompt) are within a round's
    working memory, which a prefill does not overlap."""
    rows, columns = prefill_chunk(tokens, width, tokens)
    mask = rows * columns * width * (model.dtype.itemsize + 1)
    return rows * columns * prefill_bytes_per_token(model) + rows * width * prefill_bytes_per_column(model) + mask


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device`` now: CUDA's free memory, else the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class SlotPlan:
    """The arithmetic behind ``--batch-size auto``, as the log and the manifest record it."""

    slots: int
    free_bytes: int
    memory_fraction: float
    weights_bytes: int  # already loaded, so already outside free_bytes; for the record
    kv_bytes_per_token: list[int]  # per model
    capacity: list[int]  # columns per slot, per model (longest prompt + token budget, rounded up)
    working_bytes_per_slot: int
    bytes_per_slot: int
    prefill_chunk_tokens: int  # tokens (rows x columns) a prefill forward takes at most
    prefill_bytes: int  # the largest prefill forward's working memory, reserved before the slots

    def describe(self) -> str:
        return (
            f"--batch-size auto: {self.slots} slots; each takes {size(self.bytes_per_slot)} "
            f"(KV {' + '.join(f'{c} tokens x {b} B' for c, b in zip(self.capacity, self.kv_bytes_per_token))}, "
            f"round {size(self.working_bytes_per_slot)}), of {self.memory_fraction:g} x {size(self.free_bytes)} free "
            f"beside {size(self.weights_bytes)} of weights, less {size(self.prefill_bytes)} for a prefill forward "
            f"(at most {self.prefill_chunk_tokens} tokens)"
        )

    def record(self) -> dict:
        return asdict(self)


def plan_slots(
    models: list,
    sides: list[int],
    longest: tuple[int, int],
    prompts: tuple[int, int],
    vocab: int,
    draft_k: int,
    memory_fraction: float,
    samples: int,
    free_bytes: int | None = None,
    prefill_tokens: int = PREFILL_CHUNK_TOKENS,
) -> SlotPlan:
    """The slots that fit (at most ``samples``, at least 1); ``longest[side]`` is the longest prompt +
    token budget of that side's sequences, ``prompts[side]`` its longest prompt. The models prefill one
    after another, so the largest of their prefill forwards is reserved. Refuses (exit 2) when not
    one slot fits."""
    from qstar_cli.engine.slots import round_capacity  # slots.py imports transformers' attention stack

    kv = [kv_bytes_per_token(m) for m in models]
    capacity = [round_capacity(longest[side] + 1) for side in sides]
    working = WORKING_ROWS * (draft_k + 1) * vocab * 4
    per_slot = sum(c * b for c, b in zip(capacity, kv)) + working
    device = models[0].device
    free = free_memory(device) if free_bytes is None else free_bytes
    weights = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
    prefill = max(prefill_reserve(m, prompts[side], prefill_tokens) for m, side in zip(models, sides))
    fits = (int(memory_fraction * free) - prefill) // per_slot
    plan = SlotPlan(max(1, min(fits, samples)), free, memory_fraction, weights, kv, capacity, working, per_slot, prefill_tokens, prefill)
    if fits < 1:
        raise QstarInputError(
            f"--batch-size auto: one slot needs {size(per_slot)} (keys and values for {max(capacity)} tokens "
            f"per model, and a round's working memory) beside {size(prefill)} for a prefill forward, but "
            f"{memory_fraction:g} x {size(free)} free on {device} is less; lower --max-new-tokens, shorten the prompts, use a smaller dtype or model, or raise --memory-fraction"
        )
    return plan
