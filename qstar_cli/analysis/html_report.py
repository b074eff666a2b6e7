"""``qstar report``: one self-contained HTML page to look at a run, token by token.

The page holds the run's settings and counts (manifest), the ``analyze`` statistics, checks and
plots, and a sample browser whose response tokens are coloured by a per-token field the reader
picks. It makes no network request, and its Content-Security-Policy forbids any: styles and script
are inline, plots are PNG ``data:`` URIs, and the samples are JSON in a ``<script
type="application/json">`` tag.

Size and memory are bounded by ``max_samples`` whatever the size of the run. One streaming pass
over the sidecar (:func:`~qstar_cli.analysis.statistics.analyze_sidecar`, which also gathers the statistics),
with the main file read in step, keeps the samples with the highest and the lowest sequence
log-weights (two bounded heaps) and a seeded uniform draw of the rest (the smallest random keys);
only their lines are held. Token strings come from pi_t's tokenizer, so that the spans join to the
decoded response exactly.

Per-token values are embedded as the base64 of their little-endian float32 bytes where float32
holds them exactly (the sampler computes them in float32; 5.3 characters a value instead of about
11 as decimals), else of their float64 bytes: the page reads back the sidecar's values bit for bit,
so the numbers shown on hover are the sidecar's.
"""

from __future__ import annotations

import base64
import heapq
import itertools
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import jinja2
import numpy as np
import orjson
from rich.table import Table

import qstar_cli
from qstar_cli.analysis.plots import plot_runs
from qstar_cli.analysis.statistics import CHECKS, ESS_FLOOR, RunAnalysis, analyze_sidecar, sequence_weights
from qstar_cli.analysis.tables import field_table, fmt, overview_table, run_label
from qstar_cli.errors import QstarInputError
from qstar_cli.generate.config import path_settings
from qstar_cli.grading.statistics import grade_mark
from qstar_cli.paths import local_path
from qstar_cli.runfiles.format import LineFacts, OutputPaths, not_one_run, pair_mismatch, read_manifest
from qstar_cli.runfiles.output import atomic_output, check_output

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_MAX_SAMPLES = 200
#: Per-token arrays embedded per sample; the page derives ``log_ratio = logp_theta - logp_t``.
EMBEDDED_FIELDS = ("alpha", "kl_theta", "kl_t", "logp_theta", "logp_t", "logp_q")
#: The fields a reader can colour tokens by: label, colour scale and what the colours mean.
COLOUR_FIELDS = {
    "alpha": ("alpha", "diverging", "blue: q follows pi_t (alpha 0); red: q follows pi_theta (alpha 1)"),
    "kl_theta": ("KL(q || pi_theta)", "sequential", "how far q is from pi_theta at this token (nats)"),
    "kl_t": ("KL(q || pi_t)", "sequential", "how far q is from pi_t at this token (nats)"),
    "log_ratio": ("log pi_theta - log pi_t", "diverging", "of the sampled token: red where pi_theta likes it more, blue where pi_t does"),
    "logp_q": ("log q", "reversed", "log-probability of the sampled token under q: dark where the draw was unlikely"),
}
METADATA_CHARS = 2000
TEMPLATE = "report.html.j2"


@dataclass(eq=False)
class Candidate:
    """A sample that may be embedded: its position among the readable samples and its two lines."""

    ordinal: int  # index into RunAnalysis.log_w
    log_w: float
    sidecar: dict[str, Any]
    main: dict[str, Any]


class SampleSelection:
    """The samples a page embeds, chosen in one pass with memory bounded by ``max_samples``.

    A quarter each go to the highest and the lowest sequence log-weights; the rest is a uniform
    random draw (the smallest seeded random keys) from the samples that are neither. The draw keeps
    ``max_samples`` keys, enough to fill the random share whichever samples end up as extremes.
    A sample's lines are held only while one of the three heaps holds it.
    """

    def __init__(self, max_samples: int, seed: int = 0):
        if max_samples < 1:
            raise QstarInputError(f"--max-samples must be positive, got {max_samples}")
        if not 0 <= seed < 1 << 64:
            raise QstarInputError(f"--seed must be an integer from 0 to 2^64 - 1, got {seed}")
        self.extremes = max_samples // 4
        self.random = max_samples - 2 * self.extremes
        self.rng = np.random.default_rng(seed)
        # Min-heaps of (priority, ordinal, candidate): the root is the first to leave.
        self._high: list[tuple[float, int, Candidate]] = []
        self._low: list[tuple[float, int, Candidate]] = []
        self._draw: list[tuple[float, int, Candidate]] = []
        self._sizes = (self.extremes, self.extremes, max_samples)

    def offer(self, ordinal: int, log_w: float, load: Callable[[], Candidate | None]) -> None:
        """Consider one sample; ``load`` reads its lines, only when a heap takes it (None: unusable)."""
        key = float(self.rng.random())
        weighted = not math.isnan(log_w)  # a sample without a weight can only be drawn at random
        priorities = (log_w if weighted else None, -log_w if weighted else None, -key)
        heaps = (self._high, self._low, self._draw)
        takes = [
            priority is not None and size > 0 and (len(heap) < size or priority > heap[0][0])
            for heap, size, priority in zip(heaps, self._sizes, priorities)
        ]
        if not any(takes):
            return
        candidate = load()
        if candidate is None:
            return
        for heap, size, priority, take in zip(heaps, self._sizes, priorities, takes):
            if take:
                entry = (priority, ordinal, candidate)
                heapq.heappush(heap, entry) if len(heap) < size else heapq.heapreplace(heap, entry)

    def chosen(self) -> list[tuple[str, Candidate]]:
        """``(why, candidate)`` in file order; why is ``highest weight``, ``lowest weight`` or ``random``."""
        picked: dict[int, tuple[str, Candidate]] = {}
        for why, heap in (("highest weight", self._high), ("lowest weight", self._low)):
            for _, ordinal, candidate in heap:
                picked.setdefault(ordinal, (why, candidate))
        rest = sorted((entry for entry in self._draw if entry[1] not in picked), reverse=True)  # smallest keys first
        for _, ordinal, candidate in rest[: self.random]:
            picked[ordinal] = ("random", candidate)
        return [picked[o] for o in sorted(picked)]


class _MainLines:
    """The main file read in step with the sidecar: line ``n`` of one is the same sample as line ``n`` of the other."""

    def __init__(self, file: IO[bytes]):
        self.file, self.number, self.raw = file, 0, b""

    def line(self, number: int) -> bytes:
        """Line ``number`` (counted from 1, never going back); empty past the end of the file."""
        while self.number < number:
            self.raw = self.file.readline()
            self.number += 1
        return self.raw


def _main_record(raw: bytes) -> dict[str, Any] | None:
    """A main-file line with a response to show, or None where it is torn."""
    try:
        record = orjson.loads(raw)
        if isinstance(record.get("sample_idx"), int) and isinstance(record["messages"][-1].get("content"), str):
            return record
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError, IndexError):
        pass
    return None


def token_pieces(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[str]:
    """The text each token adds to ``tokenizer.decode(ids)``; the pieces join to it exactly.

    Decoding ids one by one would break characters whose bytes span tokens and lose the leading
    space that some tokenizers strip at the start of a text. So, as incremental detokenizers do, a
    token's piece is what it adds to the decoding of a short window of the tokens before it; a
    token that ends inside a character adds nothing, and the character goes to the token that
    completes it. Pieces are checked against the whole decoding as they go, and anything left at
    the end goes to the last token.
    """
    full = tokenizer.decode(ids)
    pieces: list[str] = []
    position, window, read = 0, 0, 0  # chars of `full` given out; window start; tokens given out
    for i in range(len(ids)):
        before = tokenizer.decode(ids[window:read])
        text = tokenizer.decode(ids[window : i + 1])
        piece = text[len(before) :]
        if text.startswith(before) and piece and not piece.endswith("\ufffd") and full.startswith(piece, position):
            pieces.append(piece)
            position += len(piece)
            window, read = read, i + 1
        else:
            pieces.append("")
    if pieces:
        pieces[-1] += full[position:]
    return pieces


def packed_values(values: list[float | None]) -> tuple[str, str]:
    """``(base64 of the little-endian bytes, "float32" or "float64")``: float32 where it holds every value exactly; nulls are NaN."""
    array = np.array([np.nan if v is None else v for v in values], dtype="<f8")
    narrow = array.astype("<f4")
    if np.array_equal(narrow.astype(np.float64), array, equal_nan=True):
        return base64.b64encode(narrow.tobytes()).decode("ascii"), "float32"
    return base64.b64encode(array.tobytes()).decode("ascii"), "float64"


def sample_view(why: str, candidate: Candidate, weight: float, tokenizer: PreTrainedTokenizerBase | None) -> dict[str, Any]:
    """What the page shows of one sample (token pieces and values only where the sidecar has arrays)."""
    main, side = candidate.main, candidate.sidecar
    messages = main["messages"]
    view: dict[str, Any] = {
        "ordinal": candidate.ordinal,
        "sample_idx": side["sample_idx"],
        "response_idx": main.get("response_idx", side.get("response_idx")),
        "why": why,
        "finish_reason": side["finish_reason"],
        "num_tokens": side["num_tokens"],
        "log_w": candidate.log_w,
        "weight": weight,
        "alpha_mean": side.get("alpha_mean"),
        "prompt": [{"role": str(m.get("role")), "content": str(m.get("content"))} for m in messages[:-1]],
        "response": messages[-1]["content"],
        "metadata": {k: str(v)[:METADATA_CHARS] for k, v in main.items() if k.startswith("original_")},
        "grade": grade_mark(main.get("grade")),
    }
    per_token = side.get("per_token")
    if per_token is None or tokenizer is None:
        return view
    ids = [int(i) for i in per_token["token_id"]]
    stopped = side["finish_reason"] == "stop" and bool(ids)
    text_ids = ids[:-1] if stopped else ids
    view["tokens"] = token_pieces(tokenizer, text_ids)
    view["end_token"] = tokenizer.decode(ids[-1:]) if stopped else None
    view["joins"] = "".join(view["tokens"]) == view["response"]
    view["token_id"] = ids
    view["values"], view["dtypes"] = {}, {}
    for name in EMBEDDED_FIELDS:
        view["values"][name], view["dtypes"][name] = packed_values(per_token[name])
    return view


def colour_scales(per_token: list[dict[str, list[float | None]]]) -> dict[str, dict[str, Any]]:
    """Each colourable field's label, meaning and range over the embedded samples' ``per_token``
    arrays, robust to outliers (1st/99th percentiles)."""
    columns = {name: [np.array(arrays[name], dtype=np.float64) for arrays in per_token] for name in EMBEDDED_FIELDS}

    def finite(*names: str) -> np.ndarray:
        joined = np.concatenate([a for n in names for a in columns[n]] or [np.zeros(0)])
        return joined[np.isfinite(joined)]

    def percentile(values: np.ndarray, q: float, default: float) -> float:
        return float(np.percentile(values, q)) if values.size else default

    kl = finite("kl_theta", "kl_t")  # one scale for both KLs, so their colours compare
    ratios = np.concatenate([a - b for a, b in zip(columns["logp_theta"], columns["logp_t"])] or [np.zeros(0)])
    ratios = ratios[np.isfinite(ratios)]
    alpha_half = min(max(percentile(np.abs(finite("alpha") - 0.5), 99, 0.5), 0.01), 0.5)
    kl_top = max(percentile(kl, 99, 1.0), 1e-6)
    ratio_top = max(percentile(np.abs(ratios), 99, 1.0), 1e-6)
    ranges = {
        "alpha": (0.5 - alpha_half, 0.5, 0.5 + alpha_half),
        "kl_theta": (0.0, None, kl_top),
        "kl_t": (0.0, None, kl_top),
        "log_ratio": (-ratio_top, 0.0, ratio_top),
        "logp_q": (min(percentile(finite("logp_q"), 1, -1.0), -1e-6), None, 0.0),
    }
    return {
        name: {"label": label, "kind": kind, "meaning": meaning, "lo": ranges[name][0], "mid": ranges[name][1], "hi": ranges[name][2]}
        for name, (label, kind, meaning) in COLOUR_FIELDS.items()
    }


def table_view(table: Table) -> dict[str, Any]:
    """A rich table (:mod:`qstar_cli.analysis.tables`) as title, headers and rows of strings, for an HTML table."""
    columns = [[str(cell) for cell in column.cells] for column in table.columns]
    return {"title": str(table.title), "headers": [str(c.header) for c in table.columns], "rows": [list(r) for r in zip(*columns)]}


def plot_images(run: RunAnalysis, label: str) -> list[dict[str, str]]:
    """``analyze``'s PNG plots of the run as ``data:`` URIs."""
    with tempfile.TemporaryDirectory() as tmp:
        return [
            {"name": path.stem, "uri": "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")}
            for path in plot_runs([run], [label], tmp)
        ]


def script_json(value: Any) -> str:
    """JSON for a ``<script type="application/json">`` block: every ``<`` escaped, so no ``</script>`` can end it."""
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY).decode("utf-8").replace("<", "\\u003c")


def _tokenizer(spec: str | None, config: dict[str, Any]) -> PreTrainedTokenizerBase:
    source = spec or config.get("model_t")
    if not source:
        raise QstarInputError("the manifest names no model_t; pass pi_t's tokenizer with --tokenizer")
    try:
        from qstar_cli.engine.models import load_tokenizer  # transformers only when tokens are shown

        return load_tokenizer(str(source))
    except QstarInputError as err:  # the model's tokenizer could not be loaded
        hint = "" if spec else " (pi_t of the manifest); pass its tokenizer with --tokenizer"
        raise QstarInputError(f"pi_t's tokenizer is not reachable: {err}{hint}") from err


def run_facts(meta: dict[str, Any], run: RunAnalysis) -> list[tuple[str, str]]:
    """The headline settings, counts and throughput of a run, from its manifest."""
    config, counts = meta["config"], meta.get("counts", {})
    sessions = meta.get("sessions", [])
    seconds = sum(s.get("seconds", 0.0) for s in sessions)
    tokens = sum(s.get("new_tokens", 0) for s in sessions)
    method = config.get("alpha_method", "?")
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(counts.get("skipped", {}).items())) or "none"
    top_k = config.get("top_k")
    facts = [
        ("pi_theta", f"{config.get('model_theta')} (format {config.get('theta_format') or 'default'})"),
        ("pi_t", f"{config.get('model_t')} (format {config.get('t_format') or 'default'})"),
        ("alpha method", f"fixed, alpha = {config.get('alpha')}" if method == "fixed" else str(method)),
        (
            "sampling",
            (
                f"temperature {config.get('temperature')}, top-k {top_k if top_k else 'off'}, top-p {config.get('top_p')}, "
                f"max {config.get('max_new_tokens')} new tokens, seed {config.get('seed')}"
            ),
        ),
        (
            "dataset",
            f"{config.get('dataset')} (split {config.get('split')}, adapter {config.get('adapter_resolved', config.get('adapter'))})",
        ),
        ("diagnostics", f"{config.get('diagnostics')} (sidecar read as {run.level})"),
        (
            "status",
            f"{meta.get('status', '?')}: {counts.get('done', '?')} of {counts.get('samples', '?')} samples done, {counts.get('rows', '?')} rows read, skipped: {skipped}",
        ),
        (
            "in the sidecar",
            f"{run.samples} samples, {run.tokens} tokens"
            + (f", {len(run.corrupt_lines)} corrupt lines skipped" if run.corrupt_lines else ""),
        ),
        (
            "throughput",
            f"{tokens} new tokens in {seconds:.1f} s: {tokens / seconds:.1f} tokens/s over {len(sessions)} session(s)"
            if seconds > 0
            else "-",
        ),
        ("device", f"{meta.get('device', '?')}, {meta.get('dtype', '?')}"),
    ]
    return facts


@dataclass
class ReportSummary:
    """What ``build_report`` wrote."""

    output: Path
    embedded: int
    samples: int
    bytes: int
    notes: list[str] = field(default_factory=list)


def _selection_note(chosen: list[tuple[str, Candidate]], samples: int, seed: int) -> str:
    if len(chosen) == samples:
        return f"All {samples} samples of the run are embedded."
    count = {why: sum(1 for w, _ in chosen if w == why) for why in ("highest weight", "lowest weight", "random")}
    return (
        f"{len(chosen)} of {samples} samples are embedded: the {count['highest weight']} with the highest and the "
        f"{count['lowest weight']} with the lowest sequence weights, and {count['random']} drawn uniformly at random "
        f"(seed {seed}) from the rest. Raise --max-samples to embed more."
    )


def read_run(paths: OutputPaths, selection: SampleSelection, progress: Callable[[int, int], None] | None = None) -> tuple[RunAnalysis, int]:
    """The one streaming pass: the sidecar's statistics, and ``selection`` offered every sample with its
    main-file line; also how many samples had no usable main-file line."""
    total_bytes = paths.main.stat().st_size
    unmatched = 0
    ordinals = itertools.count()
    with paths.main.open("rb") as main_file:
        main_lines = _MainLines(main_file)

        def on_sample(number: int, record: dict[str, Any], sample) -> None:
            nonlocal unmatched
            ordinal = next(ordinals)
            main = _main_record(main_lines.line(number))
            if main is None:
                unmatched += 1
            elif (mismatch := pair_mismatch(LineFacts.of(main), LineFacts.of(record))) is not None:
                raise QstarInputError(f"{not_one_run(number, paths.main, paths.diagnostics, mismatch)}; report on the run's own files")
            selection.offer(ordinal, sample.log_w, lambda: None if main is None else Candidate(ordinal, sample.log_w, record, main))
            if progress is not None and ordinal % 256 == 0:
                progress(main_file.tell(), total_bytes)

        run = analyze_sidecar(paths.diagnostics, on_sample=on_sample)
    if progress is not None:
        progress(total_bytes, total_bytes)
    return run, unmatched


def _notes(run: RunAnalysis, unmatched: int, views: list[dict[str, Any]], main_name: str) -> list[str]:
    """What the reader must know about samples left out or shown differently."""
    notes = []
    if run.corrupt_lines:
        shown = ", ".join(map(str, run.corrupt_lines[:10])) + (" ..." if len(run.corrupt_lines) > 10 else "")
        notes.append(f"{len(run.corrupt_lines)} unreadable sidecar line(s) skipped (line {shown}); those samples are left out.")
    if unmatched:
        notes.append(f"{unmatched} sample(s) left out: their line in {main_name} is torn.")
    broken = sum(1 for v in views if "tokens" in v and not v["joins"])
    if broken:
        notes.append(
            f"In {broken} sample(s) the tokenizer's decoding of the sampled ids differs from the stored response "
            "(is it the tokenizer pi_t used?); the stored text is shown under them."
        )
    return notes


def build_report(
    run_path: str | Path,
    output: str | Path | None = None,
    tokenizer: str | None = None,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> ReportSummary:
    """Write the HTML report of the run whose main file is ``run_path`` (default output:
    ``OUT.report.html`` beside it); ``progress(bytes read, total)`` is called as the run is read."""
    paths = OutputPaths(Path(run_path))
    for path, what in ((paths.main, "run file"), (paths.diagnostics, "diagnostics sidecar")):
        if not path.is_file():
            hint = " (a run made with --diagnostics none has none)" if path == paths.diagnostics else ""
            raise QstarInputError(f"{what} not found: {path}{hint}")
    out = Path(output) if output is not None else paths.stem.with_name(paths.stem.name + ".report.html")
    meta = read_manifest(paths.meta, ("config",), "qstar generate writes it beside the run")
    # The run's files, the tokenizer, and every local input the run names (its models, dataset, templates).
    specs = [tokenizer, *(meta["config"].get(name) for name in path_settings())]
    inputs = [paths.main, paths.diagnostics, paths.meta, *(p for spec in specs if isinstance(spec, str) and (p := local_path(spec)))]
    check_output(out, "--output", inputs)
    selection = SampleSelection(max_samples, seed)
    # Level summary has no per-token arrays, so it needs no token strings; a missing tokenizer fails before the pass.
    pi_t_tokenizer = _tokenizer(tokenizer, meta["config"]) if meta["config"].get("diagnostics", "full") == "full" else None
    run, unmatched = read_run(paths, selection, progress)
    if not run.samples:
        raise QstarInputError(f"{paths.diagnostics} holds no readable samples")

    chosen_weights = sequence_weights(run.log_w, ESS_FLOOR)
    gamma, weights = chosen_weights.gamma, chosen_weights.weights
    chosen = selection.chosen()
    views = [sample_view(why, c, float(weights[c.ordinal]), pi_t_tokenizer) for why, c in chosen]
    coloured = any("values" in v for v in views)
    data = {
        "samples": views,
        "fields": colour_scales([c.sidecar["per_token"] for _, c in chosen if "per_token" in c.sidecar]),
        "coloured": coloured,
        "selected": len(views) < run.samples,
    }
    label = run_label(paths.diagnostics)
    summary = run.summary
    notes = _notes(run, unmatched, views, paths.main.name)
    why_plain = None
    if not coloured:
        why_plain = (
            f"This run's diagnostics level is {run.level}: its sidecar holds no per-token arrays, so responses are "
            "shown without token colouring. Generate with --diagnostics full to see them token by token."
        )
    template = _environment().get_template(TEMPLATE)
    page = template.render(
        title=f"qstar report: {paths.main.name}",
        run_file=str(paths.main),
        label=label,
        version=qstar_cli.__version__,
        facts=run_facts(meta, run),
        config=sorted(meta["config"].items()),
        versions=sorted(meta.get("versions", {}).items()),
        tiles=[
            ("samples", f"{run.samples:,}"),
            ("tokens", f"{run.tokens:,}"),
            ("mean length", fmt(summary["length"]["mean"], 4)),
            ("alpha mean", fmt(summary["fields"]["alpha"]["tokens"]["mean"], 3)),
            ("sequence ESS / n", fmt(summary["weights"]["ess_ratio"], 3)),
            ("|kl_theta - kl_t| < 0.05", fmt(summary["checks"]["kl_gap_below_0.05"], 3)),
            *([("accuracy", fmt(grades["accuracy"], 3))] if (grades := summary.get("grades")) else []),
            *(
                [("draft acceptance", fmt(spec["acceptance_rate"], 3)), ("tokens per round", fmt(spec["tokens_per_round"], 3))]
                if (spec := summary.get("speculative"))
                else []
            ),
        ],
        checks=[(CHECKS[k], fmt(v, 4)) for k, v in summary["checks"].items()],
        tables=[table_view(t) for t in (overview_table([run], [label]), field_table(run, "tokens"), field_table(run, "samples"))],
        plots=plot_images(run, label),
        selection_note=_selection_note(chosen, run.samples, seed),
        weight_note=(
            f"log w = logp_theta_sum - logp_q_sum; weight = w^gamma normalised to mean 1 over all {run.samples} samples, "
            f"gamma = {gamma:.4g} (the largest in [0, 1] with ESS/n >= {ESS_FLOOR}; ESS/n {chosen_weights.ess_ratio:.3f})"
        ),
        notes=notes,
        why_plain=why_plain,
        data_json=script_json(data),
    )
    with atomic_output(out) as written:
        written.write(page.encode("utf-8"))
    return ReportSummary(out, len(views), run.samples, out.stat().st_size, notes)


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("qstar_cli", "assets"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
