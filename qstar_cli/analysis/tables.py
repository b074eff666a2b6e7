"""Rich tables and run labels for ``analyze`` and ``compare``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from rich import box
from rich.table import Table

from qstar_cli.analysis.statistics import CHECKS, PERCENTILES, RunAnalysis
from qstar_cli.runfiles.format import SUMMARY_FIELDS, OutputPaths

#: Settings that change what a run's statistics measure, beside how alpha is chosen (what ``compare``
#: is for): runs that differ in them are compared only with a note saying so.
COMPARED_SETTINGS = ("model_theta", "model_t", "dataset", "max_new_tokens", "temperature", "top_k", "top_p", "samples_per_prompt")


def run_config(sidecar: Path) -> dict[str, Any] | None:
    """The configuration in the manifest of the run of ``sidecar`` (None without a readable one)."""
    try:
        config = orjson.loads(OutputPaths.of(sidecar).meta.read_bytes())["config"]
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError):
        return None
    return config if isinstance(config, dict) else None


def run_label(sidecar: Path) -> str:
    """The run's alpha method (``fixed=0.3`` for fixed) from its manifest, else the file's stem."""
    config, stem = run_config(sidecar), OutputPaths.of(sidecar).stem.name
    if config is None:
        return stem
    method = config.get("alpha_method", stem)
    return f"fixed={config.get('alpha')}" if method == "fixed" else method


def differing_settings(sidecars: list[Path]) -> dict[str, list[Any]]:
    """The :data:`COMPARED_SETTINGS` whose values differ between the runs, each with its value per run
    (None where a run has no manifest)."""
    configs = [run_config(p) or {} for p in sidecars]
    values = {name: [c.get(name) for c in configs] for name in COMPARED_SETTINGS}
    return {name: v for name, v in values.items() if len({repr(x) for x in v}) > 1}


def run_labels(sidecars: list[Path]) -> list[str]:
    """Labels for several runs; a label shared by two runs gets the file stem added."""
    labels = [run_label(p) for p in sidecars]
    return [f"{label} ({OutputPaths.of(p).stem.name})" if labels.count(label) > 1 else label for label, p in zip(labels, sidecars)]


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _table(title: str, first: str) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column(first, no_wrap=True)
    return table


def field_table(run: RunAnalysis, over: str) -> Table:
    """Mean, std and percentiles of every per-token field ``over`` ``tokens`` or ``samples`` (their means)."""
    count = f"{run.tokens} tokens" if over == "tokens" else f"the means of {run.samples} samples"
    table = _table(f"per-token fields over {count}", "field")
    stats = ("mean", "std", *(f"p{p}" for p in PERCENTILES))
    for name in stats:
        table.add_column(name, justify="right", overflow="fold", min_width=8)
    for name in SUMMARY_FIELDS:
        values = run.summary["fields"][name][over]
        table.add_row(name, *(fmt(values[k]) for k in stats))
    return table


def overview_table(runs: list[RunAnalysis], labels: list[str]) -> Table:
    """The headline numbers of each run in one column: checks, lengths, weights, field means."""
    table = _table("runs" if len(runs) > 1 else f"run {labels[0]}", "statistic")
    for label in labels:
        table.add_column(label, justify="right", overflow="fold")

    def row(name: str, values: list[str]) -> None:
        table.add_row(name, *values)

    summaries = [r.summary for r in runs]
    row("samples", [str(s["samples"]) for s in summaries])
    row("tokens", [str(s["tokens"]) for s in summaries])
    row("level", [s["level"] for s in summaries])
    for key, description in CHECKS.items():
        row(description, [fmt(s["checks"][key], 3) for s in summaries])
    row("response length mean", [fmt(s["length"]["mean"], 4) for s in summaries])
    reasons = sorted({k for s in summaries for k in s["length"]["finish_reasons"]})
    for reason in reasons:
        row(f"finish_reason {reason}", [str(s["length"]["finish_reasons"].get(reason, 0)) for s in summaries])
    row("sequence weight ESS / n", [fmt(s["weights"]["ess_ratio"], 3) for s in summaries])
    row("largest weight share", [fmt(s["weights"]["max_weight_share"], 3) for s in summaries])
    row("log w std", [fmt(s["weights"]["log_w"]["std"]) for s in summaries])
    if any(s["per_prompt"] for s in summaries):
        spread = [s["per_prompt"] or {} for s in summaries]
        row("responses per prompt", [fmt(p.get("responses_per_prompt"), 3) for p in spread])
        row("log w std within a prompt (mean)", [fmt(p.get("within_std_mean")) for p in spread])
        row("share of log w variance within prompts", [fmt(p.get("within_share"), 3) for p in spread])
    if any(s.get("speculative") for s in summaries):
        rounds = [s.get("speculative") or {} for s in summaries]
        row("draft acceptance rate", [fmt(r.get("acceptance_rate"), 3) for r in rounds])
        row("tokens per round", [fmt(r.get("tokens_per_round"), 3) for r in rounds])
        row("drafts per round", [fmt(r.get("drafts_per_round"), 3) for r in rounds])
    if any(s["grades"] for s in summaries):
        grade_rows(row, [s["grades"] or {} for s in summaries])
    for name in SUMMARY_FIELDS:
        row(f"{name} mean (tokens)", [fmt(s["fields"][name]["tokens"]["mean"], 4) for s in summaries])
    row("corrupt lines skipped", [str(s["corrupt_lines"]) for s in summaries])
    return table


def grade_rows(row: Callable[[str, list[str]], None], grades: list[dict[str, Any]]) -> None:
    """Accuracy, failures, pass@k and majority vote of graded runs, and accuracy beside the weight."""
    row("graded (of samples)", [f"{g['graded']} of {g['samples']}" if g else "-" for g in grades])
    row("accuracy", [fmt(g.get("accuracy"), 3) for g in grades])
    if any(g.get("truncated") for g in grades):
        row("graded wrong: truncated", [str(g.get("truncated", 0)) for g in grades])
    for reason in sorted({r for g in grades for r in g.get("failures", {})}):
        row(f"ungraded: {reason}", [str(g.get("failures", {}).get(reason, 0)) for g in grades])
    if any(g.get("not_graded") for g in grades):
        row("not graded (no grade in the line)", [str(g.get("not_graded", 0)) for g in grades])
    row("prompts all graded (pass@k, vote)", [f"{g['prompts_all_graded']} of {g['prompts']}" if g else "-" for g in grades])
    for k in sorted({k for g in grades for k in g.get("pass_at_k", {})}, key=int):
        row(f"pass@{k}", [fmt(g.get("pass_at_k", {}).get(k), 3) for g in grades])
    # A graded run without extracted answers (a custom grader's grades) has no vote to take: n/a.
    row(
        "majority-vote accuracy",
        [fmt(g["majority_accuracy"], 3) if g.get("majority_accuracy") is not None else "n/a" if g else "-" for g in grades],
    )
    weights = [g.get("by_weight") or {} for g in grades]
    row(
        "log w mean, right / wrong",
        [f"{fmt(w.get('log_w_mean_correct'))} / {fmt(w.get('log_w_mean_wrong'))}" if w else "-" for w in weights],
    )
    row("accuracy by log w quarter", [" ".join(fmt(a, 2) for a in w.get("accuracy_by_log_w_quarter", [])) or "-" for w in weights])
