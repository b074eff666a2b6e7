"""Reading a diagnostics sidecar back: statistics, theoretical checks and importance weights.

The sidecar is streamed line by line, so its size is not bounded by memory. What is kept:

* per sample: the summary fields (``<field>_mean`` ...), the length, the finish reason and the
  sequence log-weight ``log w = logp_theta_sum - logp_q_sum``: a few hundred bytes a sample;
* at level ``full``, per token: exact counts for the theoretical checks, the alpha histogram, the mean
  alpha at each response position, and a uniform random sample of whole token rows (bottom-k by a
  seeded random key) from which the percentiles and the scatter plots come. With up to
  ``RESERVOIR_SIZE`` tokens every token is kept and the percentiles are exact.

Token-level means and standard deviations are exact at both levels: they are pooled from the
per-sample means and standard deviations. ``null`` values (non-finite, e.g. ``ess_ratio`` where
``ess_t`` is 0) are left out of the statistics.

Importance weights: ``w_i = exp(log w_i)``; the normalised effective sample size
``ESS / n = (sum w)^2 / (n sum w^2)`` is computed in log space. For training, ``w^gamma`` tempers
the weights; :func:`choose_gamma` picks the largest gamma in [0, 1] whose ESS ratio stays at or above
a floor. :func:`sequence_weights` gives the training weights that both ``analyze --export-weights``
and ``export`` write.
"""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qstar_cli.analysis import ESS_FLOOR
from qstar_cli.grading.statistics import run_grades
from qstar_cli.runfiles.format import SUMMARY_FIELDS, read_line, sidecar_record

PERCENTILES = (5, 25, 50, 75, 95)
RESERVOIR_SIZE = 1 << 20
ALPHA_BINS = np.linspace(0.0, 1.0, 51)
#: The theoretical checks (docs/analyze.md), as shares of tokens.
CHECKS = {
    "kl_gap_below_0.05": "share of tokens with |kl_theta - kl_t| < 0.05",
    "ess_ratio_in_0.8_1.2": "share of tokens with ess_ratio in [0.8, 1.2]",
    "alpha_in_0.2_0.8": "share of tokens with alpha in [0.2, 0.8]",
}
REQUIRED_KEYS = ("sample_idx", "num_tokens", "finish_reason", "logp_theta_sum", "logp_q_sum")


def describe(values: np.ndarray) -> dict[str, float | None]:
    """mean, std, min, max and the percentiles of the finite values (all None when there are none)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    keys = ["mean", "std", "min", "max", *(f"p{p}" for p in PERCENTILES)]
    if values.size == 0:
        return dict.fromkeys(keys)
    stats = [values.mean(), values.std(), values.min(), values.max(), *np.percentile(values, PERCENTILES)]
    return {k: float(v) for k, v in zip(keys, stats)}


def logsumexp(x: np.ndarray) -> float:
    return float(np.logaddexp.reduce(x)) if x.size else -np.inf


def ess_ratio(log_w: np.ndarray) -> float:
    """Normalised effective sample size ``(sum w)^2 / (n sum w^2)`` of weights ``exp(log_w)``, in (0, 1]."""
    log_w = np.asarray(log_w, dtype=np.float64)
    if log_w.size == 0:
        return float("nan")
    return float(np.exp(2 * logsumexp(log_w) - np.log(log_w.size) - logsumexp(2 * log_w)))


def choose_gamma(log_w: np.ndarray, ess_floor: float = ESS_FLOOR, iterations: int = 60) -> float:
    """The largest gamma in [0, 1] with ``ess_ratio(gamma * log_w) >= ess_floor``.

    ESS(gamma) is 1 at gamma = 0 and falls as gamma grows (the weights sharpen), so bisection finds
    the crossing; gamma = 1 when the untempered weights already meet the floor.
    """
    if not 0.0 < ess_floor <= 1.0:
        raise ValueError(f"ess floor must lie in (0, 1], got {ess_floor}")
    log_w = np.asarray(log_w, dtype=np.float64)
    if ess_ratio(log_w) >= ess_floor:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if ess_ratio(mid * log_w) >= ess_floor else (lo, mid)
    return lo


def tempered_weights(log_w: np.ndarray, gamma: float) -> np.ndarray:
    """``w^gamma`` self-normalised to mean 1 (so a weighted loss keeps its scale)."""
    scaled = gamma * np.asarray(log_w, dtype=np.float64)
    return np.exp(scaled - logsumexp(scaled) + np.log(scaled.size))


@dataclass(frozen=True)
class SequenceWeights:
    """Training weights of n samples: ``w^gamma`` self-normalised to mean 1, with its gamma and ESS/n."""

    log_w: np.ndarray
    gamma: float
    weights: np.ndarray
    ess_ratio: float


def sequence_weights(log_w: np.ndarray, ess_floor: float = ESS_FLOOR, gamma: float | None = None) -> SequenceWeights:
    """The weights ``analyze --export-weights`` and ``export`` write: gamma fixed, or chosen at the ESS floor."""
    log_w = np.asarray(log_w, dtype=np.float64)
    if gamma is None:
        gamma = choose_gamma(log_w, ess_floor)
    elif not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
    return SequenceWeights(log_w, gamma, tempered_weights(log_w, gamma), ess_ratio(gamma * log_w))


def sequence_log_weight(record: dict[str, Any]) -> float:
    """``log w = logp_theta_sum - logp_q_sum`` of a sidecar line (NaN where a sum is ``null``)."""
    return _number(record["logp_theta_sum"]) - _number(record["logp_q_sum"])


def iter_sidecar(path: Path, corrupt: list[int]) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` of a sidecar, each line of any earlier format version read in this
    one's shape (:func:`~qstar_cli.runfiles.format.sidecar_record`); the numbers of unreadable or
    incomplete lines go to ``corrupt``, and a line of a newer format is refused."""
    with Path(path).open("rb") as f:
        for number, line in enumerate(f, start=1):
            record = read_line(line, path, number)
            if record is None or any(k not in record for k in REQUIRED_KEYS):
                corrupt.append(number)
                continue
            yield number, sidecar_record(record)


class TokenReservoir:
    """A uniform random sample of at most ``size`` token rows, as the ``size`` smallest random keys.

    New rows wait in a buffer that is cut back to the ``size`` smallest keys once it holds
    ``size / 4`` rows: a row costs amortised O(1) (cutting back at every add would cost O(size) per
    sample), and memory peaks at 2.5 times the kept rows.
    """

    def __init__(self, fields: tuple[str, ...], size: int = RESERVOIR_SIZE, seed: int = 0):
        self.fields, self.size = fields, size
        self.rng = np.random.default_rng(seed)
        self._keys = [np.empty(0)]
        self._rows = [np.empty((0, len(fields)))]
        self._buffered = 0

    def add(self, rows: np.ndarray) -> None:
        self._keys.append(self.rng.random(len(rows)))
        self._rows.append(rows)
        self._buffered += len(rows)
        if self._buffered >= max(self.size // 4, 1):
            self._cut()

    def _cut(self) -> None:
        keys, rows = np.concatenate(self._keys), np.concatenate(self._rows)
        self._keys, self._rows = [], []  # free the parts before selecting
        if len(keys) > self.size:
            keep = np.argpartition(keys, self.size)[: self.size]
            keys, rows = keys[keep], rows[keep]
        self._keys, self._rows, self._buffered = [keys], [rows], 0

    @property
    def rows(self) -> np.ndarray:
        if len(self._rows) > 1:
            self._cut()
        return self._rows[0]

    def column(self, name: str) -> np.ndarray:
        return self.rows[:, self.fields.index(name)]


@dataclass
class RunAnalysis:
    """Everything ``analyze`` reports and plots about one sidecar."""

    path: Path
    level: str
    samples: int
    tokens: int
    corrupt_lines: list[int]
    summary: dict[str, Any]
    log_w: np.ndarray
    lengths: np.ndarray
    alpha_histogram: np.ndarray  # counts over ALPHA_BINS (full level)
    alpha_by_position: np.ndarray  # mean alpha at response position 0, 1, ... (full level)
    reservoir: TokenReservoir | None
    sample_idx: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    response_idx: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))


def _pooled(n: np.ndarray, means: np.ndarray, stds: np.ndarray) -> tuple[float | None, float | None]:
    """Token-level mean and std from per-sample counts, means and stds (non-finite samples left out)."""
    ok = np.isfinite(means) & np.isfinite(stds)
    total = n[ok].sum()
    if total == 0:
        return None, None
    mean = float((n[ok] * means[ok]).sum() / total)
    second = float((n[ok] * (stds[ok] ** 2 + means[ok] ** 2)).sum() / total)
    return mean, float(np.sqrt(max(second - mean * mean, 0.0)))


@dataclass
class _Sample:
    """What the analysis keeps of one sidecar line (``rows`` only at level full)."""

    sample_idx: int
    response_idx: int
    num_tokens: int
    finish_reason: str
    log_w: float
    stats: np.ndarray  # [4, fields]: mean, std, min, max
    rows: np.ndarray | None  # [tokens, fields]
    rounds: np.ndarray | None = None  # speculative: rounds, drafts, drafts accepted, drafts tested


def speculative_counts(draft_lengths: list[int], round_tokens: list[int]) -> np.ndarray:
    """``[rounds, drafted, accepted, tested]`` of a speculative sample's recorded rounds: a round
    that emitted ``r`` tokens of ``d`` drafts accepted ``r - 1`` and tested ``min(r, d)`` (drafts
    after a rejection are never tested). A manifest counts one more accepted where an EOS among
    the drafts ended the sample, which the sidecar cannot tell from an EOS drawn after them."""
    d, r = np.asarray(draft_lengths, dtype=np.int64), np.asarray(round_tokens, dtype=np.int64)
    if d.shape != r.shape or d.ndim != 1 or (r < 1).any() or (r > d + 1).any():
        raise ValueError("draft_lengths and round_tokens do not describe rounds")
    return np.array([len(d), d.sum(), (r - 1).sum(), np.minimum(r, d).sum()])


def _parse(record: dict[str, Any]) -> _Sample:
    """Raises ``ValueError``/``TypeError``/``KeyError``/``OverflowError`` on a malformed record."""
    stats = np.array([[_number(record.get(f"{name}_{s}")) for name in SUMMARY_FIELDS] for s in ("mean", "std", "min", "max")])
    arrays = record.get("per_token")
    rows = None
    if arrays is not None:
        rows = np.array([arrays[name] for name in SUMMARY_FIELDS], dtype=np.float64).T
        if rows.ndim != 2 or len(rows) != record["num_tokens"]:
            raise ValueError("per_token arrays do not match num_tokens")
    identity = int(record["sample_idx"]), int(record["response_idx"]), int(record["num_tokens"]), str(record["finish_reason"])
    rounds = None
    if "draft_lengths" in record:
        rounds = speculative_counts(record["draft_lengths"], record["round_tokens"])
        if sum(record["round_tokens"]) != identity[2]:
            raise ValueError("round_tokens do not add up to num_tokens")
    return _Sample(*identity, sequence_log_weight(record), stats, rows, rounds)


def _speculative_summary(counts: np.ndarray, samples: int, tokens: int) -> dict[str, Any] | None:
    """A speculative run's rounds: acceptance rate (per draft tested), tokens and drafts per round."""
    rounds, drafted, accepted, tested = (int(c) for c in counts)
    if not samples:
        return None
    return {
        "samples": samples,
        "rounds": rounds,
        "acceptance_rate": accepted / tested if tested else None,
        "tokens_per_round": tokens / rounds if rounds else None,
        "drafts_per_round": drafted / rounds if rounds else None,
        "accepted_per_round": accepted / rounds if rounds else None,
    }


class SidecarTotals:
    """What the analysis of a sidecar keeps as it streams by: :meth:`add` takes one sample,
    :meth:`finish` makes the :class:`RunAnalysis` of all added."""

    def __init__(self, reservoir_size: int = RESERVOIR_SIZE):
        self.stats = [array("d") for _ in range(4 * len(SUMMARY_FIELDS))]  # per sample, flattened [4, fields]
        self.lengths, self.log_w, self.indices, self.responses = array("d"), array("d"), array("q"), array("q")
        self.finish_reasons: Counter[str] = Counter()
        self.reservoir = TokenReservoir(SUMMARY_FIELDS, reservoir_size)
        self.hist = np.zeros(len(ALPHA_BINS) - 1, dtype=np.int64)
        self.pos_sum, self.pos_count = np.zeros(0), np.zeros(0, dtype=np.int64)
        self.checks: Counter[str] = Counter()
        self.full_samples = 0
        self.rounds, self.round_samples, self.round_sample_tokens = np.zeros(4, dtype=np.int64), 0, 0

    def add(self, sample: _Sample) -> None:
        """Count one sample (its token rows too, at level full)."""
        self.indices.append(sample.sample_idx)
        self.responses.append(sample.response_idx)
        self.lengths.append(sample.num_tokens)
        self.finish_reasons[sample.finish_reason] += 1
        self.log_w.append(sample.log_w)
        for store, value in zip(self.stats, sample.stats.ravel()):
            store.append(value)
        if sample.rounds is not None:
            self.rounds += sample.rounds
            self.round_samples += 1
            self.round_sample_tokens += sample.num_tokens
        if sample.rows is not None:
            self._add_rows(sample.rows)

    def _add_rows(self, rows: np.ndarray) -> None:
        """A full-level sample's token rows: the reservoir, the checks, the alpha histogram and the mean
        alpha by position."""
        self.full_samples += 1
        self.reservoir.add(rows)
        alpha, kl_theta, kl_t, ratio = (rows[:, SUMMARY_FIELDS.index(n)] for n in ("alpha", "kl_theta", "kl_t", "ess_ratio"))
        self.checks["kl_gap_below_0.05"] += int((np.abs(kl_theta - kl_t) < 0.05).sum())
        self.checks["ess_ratio_in_0.8_1.2"] += int(((ratio >= 0.8) & (ratio <= 1.2)).sum())
        self.checks["alpha_in_0.2_0.8"] += int(((alpha >= 0.2) & (alpha <= 0.8)).sum())
        self.hist += np.histogram(alpha, bins=ALPHA_BINS)[0]
        if len(alpha) > len(self.pos_sum):
            self.pos_sum = np.pad(self.pos_sum, (0, len(alpha) - len(self.pos_sum)))
            self.pos_count = np.pad(self.pos_count, (0, len(alpha) - len(self.pos_count)))
        self.pos_sum[: len(alpha)] += alpha
        self.pos_count[: len(alpha)] += 1

    def _fields(self, level: str) -> dict[str, Any]:
        """Each field's statistics over tokens (pooled; percentiles from the reservoir at level full) and over samples."""
        n = np.asarray(self.lengths)
        per_sample = np.asarray(self.stats).reshape(4, len(SUMMARY_FIELDS), -1)  # [stat, field, sample]
        fields = {}
        for i, name in enumerate(SUMMARY_FIELDS):
            means, stds, mins, maxs = per_sample[:, i]
            mean, std = _pooled(n, means, stds)
            percentiles = describe(self.reservoir.column(name)) if level == "full" else {}
            over_tokens = {
                "mean": mean,
                "std": std,
                "min": describe(mins)["min"],
                "max": describe(maxs)["max"],
                **{f"p{p}": percentiles.get(f"p{p}") for p in PERCENTILES},
            }
            fields[name] = {"tokens": over_tokens, "samples": describe(means)}
        return fields

    def finish(self, path: Path, corrupt: list[int]) -> RunAnalysis:
        """The analysis of the samples added, read from ``path`` (whose unreadable lines are ``corrupt``)."""
        n = np.asarray(self.lengths)
        samples = len(self.lengths)
        level = "full" if samples and self.full_samples == samples else "summary"
        tokens = int(n.sum())
        log_w_arr = np.asarray(self.log_w)
        indices, responses = np.asarray(self.indices, dtype=np.int64), np.asarray(self.responses, dtype=np.int64)
        summary = {
            "file": str(path),
            "level": level,
            "samples": samples,
            "tokens": tokens,
            "corrupt_lines": len(corrupt),
            "fields": self._fields(level),
            "checks": {k: (self.checks[k] / tokens if tokens else None) if level == "full" else None for k in CHECKS},
            "length": {**describe(n), "finish_reasons": dict(sorted(self.finish_reasons.items()))},
            "weights": {
                "log_w": describe(log_w_arr),
                "non_finite": int(np.count_nonzero(~np.isfinite(log_w_arr))),  # left out of the statistics and plots
                "ess_ratio": ess_ratio(log_w_arr) if samples else None,
                "max_weight_share": float(np.exp(log_w_arr.max() - logsumexp(log_w_arr))) if samples else None,
            },
            "per_prompt": per_prompt_spread(indices, log_w_arr),
            "speculative": _speculative_summary(self.rounds, self.round_samples, self.round_sample_tokens),
            "grades": run_grades(path, indices, responses, log_w_arr),
        }
        return RunAnalysis(
            path=path,
            level=level,
            samples=samples,
            tokens=tokens,
            corrupt_lines=corrupt,
            summary=summary,
            log_w=log_w_arr,
            lengths=n,
            alpha_histogram=self.hist,
            alpha_by_position=self.pos_sum / np.maximum(self.pos_count, 1),
            reservoir=self.reservoir if level == "full" else None,
            sample_idx=indices,
            response_idx=responses,
        )


def analyze_sidecar(
    path: str | Path,
    reservoir_size: int = RESERVOIR_SIZE,
    on_sample: Callable[[int, dict[str, Any], _Sample], None] | None = None,
) -> RunAnalysis:
    """Stream a ``.diagnostics.jsonl`` file into a :class:`RunAnalysis`.

    ``on_sample(line number, record, sample)`` sees every readable sample as it streams by, in file
    order, so a caller (``qstar report``) needs no second pass over the file.
    """
    path = Path(path)
    corrupt: list[int] = []
    totals = SidecarTotals(reservoir_size)
    for number, record in iter_sidecar(path, corrupt):
        try:
            sample = _parse(record)
        except (ValueError, TypeError, KeyError, OverflowError):
            corrupt.append(number)
            continue
        totals.add(sample)
        if on_sample is not None:
            on_sample(number, record, sample)
    return totals.finish(path, corrupt)


def per_prompt_spread(sample_idx: np.ndarray, log_w: np.ndarray) -> dict[str, float] | None:
    """How sequence log-weights spread among the responses to one prompt (None with one response each).

    ``within_std_mean``: the mean over prompts of the std of their responses' log w;
    ``within_share``: the share of log w's total variance that lies within prompts (1 - the
    between-prompt share), i.e. how much weight variance is sampling noise rather than prompt
    difficulty.
    """
    prompts, inverse, counts = np.unique(sample_idx, return_inverse=True, return_counts=True)
    if not len(prompts) or counts.max() < 2:
        return None
    means = np.bincount(inverse, weights=log_w) / counts
    within_ss = np.bincount(inverse, weights=(log_w - means[inverse]) ** 2)
    total_ss = float(((log_w - log_w.mean()) ** 2).sum())
    return {
        "prompts": int(len(prompts)),
        "responses_per_prompt": float(counts.mean()),
        "within_std_mean": float(np.sqrt(within_ss / counts).mean()),
        "within_share": float(within_ss.sum() / total_ss) if total_ss > 0 else None,
    }


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)


def weight_records(run: RunAnalysis, ess_floor: float = ESS_FLOOR) -> tuple[list[dict[str, Any]], SequenceWeights]:
    """Per-sample training weights (``sample_idx``, ``response_idx``, ``log_w``, ``weight``, ``gamma``) and their summary."""
    chosen = sequence_weights(run.log_w, ess_floor)
    records = [
        {"sample_idx": int(i), "response_idx": int(k), "log_w": float(lw), "weight": float(w), "gamma": chosen.gamma}
        for i, k, lw, w in zip(run.sample_idx, run.response_idx, chosen.log_w, chosen.weights)
    ]
    return records, chosen
