"""Sampling from ``log q``: temperature, top-k, top-p, greedy, and counter-based randomness.

The token a sample draws at token index ``t`` (its ``t``-th token) is a function of ``(seed,
counter_key, t)`` and the distribution only: each row's uniform number is a hash of that triple
(SplitMix64, computed on the device in int64 arithmetic), and the token is found by inverse-CDF.
Batch size, batch composition, order, and the point at which a run was resumed therefore never
change a draw. Response ``k`` of dataset row ``r`` (``--samples-per-prompt``) has the counter key
``counter_key(r, k) = r + k * 2^32``, so response 0 draws exactly as a single response did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1
#: Devices whose ``cumsum`` adds a row's entries in order into one accumulator (:func:`sample_tokens`).
SEQUENTIAL_SCAN_DEVICES = ("cpu",)


def _as_int64(value: int) -> int:
    """A 64-bit pattern as the signed int64 that torch stores."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _as_int64(0x9E3779B97F4A7C15)
_MIX1 = _as_int64(0xBF58476D1CE4E5B9)
_MIX2 = _as_int64(0x94D049BB133111EB)
_STREAM = _as_int64(0xD1B54A32D192ED03)


def _shr(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(x: Tensor) -> Tensor:
    # Integer multiplication wraps modulo 2^64 in torch, as SplitMix64 needs.
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def counter_key(sample_idx, response_idx):
    """The counter key of response ``response_idx`` of dataset row ``sample_idx`` (rows below 2^32;
    integers or int64 tensors)."""
    return sample_idx + (response_idx << 32)


def counter_uniform(seed: int, counter_key: Tensor, token_index: Tensor, stream: int = 0) -> Tensor:
    """One uniform float in (0, 1) per row, a pure function of ``(seed, counter_key, token_index, stream)``.

    ``counter_key`` and ``token_index`` are int64 tensors of the same shape; ``stream`` separates uses
    (token draws, speculative acceptance tests) of one counter. 24-bit resolution, float32.
    """
    # The stream's offset wraps modulo 2^64 as the tensor arithmetic does (streams 0-2 as before).
    seeded = _splitmix64(torch.full_like(counter_key, _as_int64(seed)) + _as_int64(stream * _STREAM))
    x = _splitmix64(seeded ^ counter_key)
    x = _splitmix64(x ^ token_index)
    return (_shr(x, 40).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


@dataclass(frozen=True)
class SamplingParams:
    """How a token is drawn from q. ``temperature = 0`` is greedy; ``top_k = 0`` and ``top_p = 1`` are off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0 or not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")


def sampling_logprobs(logp_q: Tensor, params: SamplingParams) -> Tensor:
    """The normalised log-distribution actually sampled: ``log q`` tempered, then top-k, then top-p.

    Greedy (temperature 0) is a point mass on the argmax of q (first index on ties).
    """
    if params.temperature == 0:
        top = logp_q.argmax(dim=-1, keepdim=True)
        return torch.full_like(logp_q, -math.inf).scatter_(-1, top, 0.0)
    if params.temperature == 1 and params.top_k == 0 and params.top_p == 1:
        return logp_q  # already normalised: nothing to transform
    logits = logp_q if params.temperature == 1 else logp_q / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if params.top_p < 1:
        # Keep the smallest set of most likely tokens whose mass reaches top_p (the first token is
        # always kept): drop a token when the mass strictly before it already reaches top_p.
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    return torch.log_softmax(logits, dim=-1)


def sample_tokens(logp: Tensor, uniform: Tensor) -> Tensor:
    """Inverse-CDF draw from each row of normalised ``logp`` with that row's ``uniform`` in (0, 1].

    The cdf steps at entries with mass only, so zero-probability tokens are never drawn: a parallel
    scan (CUDA's ``cumsum``) sums each prefix in its own order and may round the prefix at a zero
    entry above the one before it, so there a zero entry's prefix is replaced by the running maximum
    of the prefixes before it (which also keeps the cdf sorted). A CPU's ``cumsum`` adds the entries
    in order into one accumulator, so a zero entry's prefix already equals the one before it (the
    same cdf, without the running maximum's pass). The first index whose cdf reaches ``u * total`` is
    then one where the cdf rises. A row of NaN (a model that emitted NaN, caught after the round)
    draws an id within the vocabulary (the search returns one past the end for a NaN target).
    """
    probs = logp.exp()
    cdf = probs.cumsum(dim=-1)
    if cdf.device.type not in SEQUENTIAL_SCAN_DEVICES:
        cdf = torch.where(probs > 0, cdf, 0.0).cummax(dim=-1).values
    target = (uniform.to(cdf.dtype) * cdf[..., -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)
