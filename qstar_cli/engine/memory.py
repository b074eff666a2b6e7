"""How many slots fit: ``--batch-size auto``.

Each slot holds, for every model, keys and values for the longest sequence the schedule needs
(:class:`~qstar_cli.engine.slots.SlotCache` sizes them so), and a round's working memory: float32
log-probs and the mixture's temporaries over the vocabulary for each of its ``draft_k + 1`` queries.
The slots are what ``memory_fraction`` of the memory still free once the models are loaded holds
(CUDA: ``mem_get_info``; CPU: the kernel's available memory), so weights are counted as loaded.
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
    """Key and value bytes one token takes in a model's cache: layers x 2 x kv_heads x head_dim x dtype bytes."""
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return config.num_hidden_layers * 2 * kv_heads * head_dim * model.dtype.itemsize


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

    def describe(self) -> str:
        return (
            f"--batch-size auto: {self.slots} slots; each takes {size(self.bytes_per_slot)} "
            f"(KV {' + '.join(f'{c} tokens x {b} B' for c, b in zip(self.capacity, self.kv_bytes_per_token))}, "
            f"round {size(self.working_bytes_per_slot)}), of {self.memory_fraction:g} x {size(self.free_bytes)} free "
            f"beside {size(self.weights_bytes)} of weights"
        )

    def record(self) -> dict:
        return asdict(self)


def plan_slots(
    models: list, sides: list[int], longest: tuple[int, int], vocab: int, draft_k: int, memory_fraction: float,
    samples: int, free_bytes: int | None = None,
) -> SlotPlan:
    """The slots that fit (at most ``samples``, at least 1); ``longest[side]`` is the longest prompt +
    token budget of that side's sequences. Refuses (exit 2) when not one slot fits."""
    from qstar_cli.engine.slots import round_capacity  # slots.py imports transformers' attention stack

    kv = [kv_bytes_per_token(m) for m in models]
    capacity = [round_capacity(longest[side] + 1) for side in sides]
    working = WORKING_ROWS * (draft_k + 1) * vocab * 4
    per_slot = sum(c * b for c, b in zip(capacity, kv)) + working
    device = models[0].device
    free = free_memory(device) if free_bytes is None else free_bytes
    weights = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
    fits = int(memory_fraction * free) // per_slot
    plan = SlotPlan(max(1, min(fits, samples)), free, memory_fraction, weights, kv, capacity, working, per_slot)
    if fits < 1:
        raise QstarInputError(
            f"--batch-size auto: one slot needs {size(per_slot)} (keys and values for {max(capacity)} tokens "
            f"per model, and a round's working memory), but {memory_fraction:g} x {size(free)} free on {device} "
            "is less; lower --max-new-tokens, shorten the prompts, use a smaller dtype or model, or raise --memory-fraction"
        )
    return plan
