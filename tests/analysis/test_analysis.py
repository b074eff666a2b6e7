"""analyze / compare on sidecars from the tiny-model pipeline, checked against the raw arrays."""

import json
import tracemalloc

import numpy as np
import orjson
import pytest
from typer.testing import CliRunner

from qstar_cli.analysis.statistics import (
    PERCENTILES,
    TokenReservoir,
    analyze_sidecar,
    choose_gamma,
    ess_ratio,
    tempered_weights,
)
from qstar_cli.analysis.tables import fmt
from qstar_cli.cli import app
from qstar_cli.runfiles.writer import SUMMARY_FIELDS
from tests.helpers import tiny_generate_args, write_prompts

PROMPTS = [{"prompt": f"Tell me about the number {i}."} for i in range(12)]
PLOTS = {"alpha_histogram.png", "alpha_by_position.png", "kl_scatter.png", "ess_scatter.png", "response_length.png", "log_weights.png"}


def invoke(*args):
    result = CliRunner().invoke(app, list(args))
    return result


@pytest.fixture(scope="module")
def runs(tiny_model_dirs, tmp_path_factory):
    """Sidecars of four tiny-model runs: kl_symmetry (full), fixed 0.3 (full), kl_symmetry (summary),
    and speculative (``--draft-k 3``)."""
    root = tmp_path_factory.mktemp("runs")
    common = tiny_generate_args(tiny_model_dirs, write_prompts(root, PROMPTS), 24, 4)
    variants = {
        "kl": [],
        "fixed": ["--alpha-method", "fixed", "--alpha", "0.3"],
        "summary": ["--diagnostics", "summary"],
        "speculative": ["--draft-k", "3"],
    }
    for name, extra in variants.items():
        result = invoke(*common, *extra, "--output", str(root / f"{name}.jsonl"))
        assert result.exit_code == 0, result.output
    return {name: root / f"{name}.diagnostics.jsonl" for name in variants}


def raw(path):
    lines = [orjson.loads(line) for line in open(path, "rb")]
    tokens = {name: np.concatenate([np.array(r["per_token"][name], dtype=float) for r in lines]) for name in SUMMARY_FIELDS}
    return lines, tokens


def analyze_json(*args):
    result = invoke("analyze", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_analyze_numbers_equal_an_independent_computation(runs):
    report = analyze_json(str(runs["kl"]))
    lines, tokens = raw(runs["kl"])
    assert report["label"] == "kl_symmetry" and report["level"] == "full"
    assert report["samples"] == 12 and report["tokens"] == len(tokens["alpha"]) and report["corrupt_lines"] == 0
    for name, values in tokens.items():
        stats = report["fields"][name]["tokens"]
        assert stats["mean"] == pytest.approx(values.mean(), rel=1e-10, abs=1e-12)
        assert stats["std"] == pytest.approx(values.std(), rel=1e-6, abs=1e-9)
        assert (stats["min"], stats["max"]) == (values.min(), values.max())
        assert [stats[f"p{p}"] for p in PERCENTILES] == pytest.approx(np.percentile(values, PERCENTILES), rel=1e-12)
        sample_means = np.array([np.mean(r["per_token"][name]) for r in lines])
        assert report["fields"][name]["samples"]["mean"] == pytest.approx(sample_means.mean(), rel=1e-10, abs=1e-12)
        assert report["fields"][name]["samples"]["p50"] == pytest.approx(np.median(sample_means), rel=1e-10, abs=1e-12)
    n = len(tokens["alpha"])
    checks = report["checks"]
    assert checks["kl_gap_below_0.05"] == np.sum(np.abs(tokens["kl_theta"] - tokens["kl_t"]) < 0.05) / n
    assert checks["ess_ratio_in_0.8_1.2"] == np.sum((tokens["ess_ratio"] >= 0.8) & (tokens["ess_ratio"] <= 1.2)) / n
    assert checks["alpha_in_0.2_0.8"] == np.sum((tokens["alpha"] >= 0.2) & (tokens["alpha"] <= 0.8)) / n
    lengths = np.array([len(r["per_token"]["alpha"]) for r in lines])
    assert report["length"]["mean"] == pytest.approx(lengths.mean())
    assert sum(report["length"]["finish_reasons"].values()) == 12
    log_w = np.array([sum(r["per_token"]["logp_theta"]) - sum(r["per_token"]["logp_q"]) for r in lines])
    w = np.exp(log_w - log_w.max())
    assert report["weights"]["ess_ratio"] == pytest.approx(w.sum() ** 2 / (12 * (w**2).sum()), rel=1e-9)
    assert report["weights"]["max_weight_share"] == pytest.approx(w.max() / w.sum(), rel=1e-9)
    assert report["weights"]["log_w"]["mean"] == pytest.approx(log_w.mean(), rel=1e-9)


def test_summary_level_gives_what_it_can(runs):
    report = analyze_json(str(runs["summary"]))
    _, tokens = raw(runs["kl"])  # same settings, so the same samples
    assert report["level"] == "summary"
    assert all(v is None for v in report["checks"].values())
    for name, values in tokens.items():
        stats = report["fields"][name]["tokens"]
        assert stats["mean"] == pytest.approx(values.mean(), rel=1e-10, abs=1e-12)
        assert stats["std"] == pytest.approx(values.std(), rel=1e-6, abs=1e-9)
        assert stats["p50"] is None


def test_corrupt_lines_are_skipped_and_counted(runs, tmp_path):
    lines = open(runs["kl"], "rb").read().splitlines(keepends=True)
    damaged = tmp_path / "damaged.diagnostics.jsonl"
    damaged.write_bytes(lines[0] + b"{not json\n" + b'{"sample_idx": 5}\n' + b"".join(lines[1:-1]) + lines[-1][:100])
    clean = tmp_path / "clean.diagnostics.jsonl"
    clean.write_bytes(b"".join(lines[:-1]))
    result = invoke("analyze", str(damaged), "--json")
    assert result.exit_code == 0 and "skipped 3 corrupt line(s): 2, 3, 14" in result.stderr
    report, expected = json.loads(result.stdout), analyze_json(str(clean))
    assert report["corrupt_lines"] == 3 and report["samples"] == 11
    assert report["fields"] == expected["fields"] and report["weights"] == expected["weights"]


def test_plots_and_tables(runs, tmp_path):
    result = invoke("analyze", str(runs["kl"]), "--plots", str(tmp_path / "one"))
    assert result.exit_code == 0
    assert "share of tokens with alpha in [0.2, 0.8]" in result.stdout and "entropy_q" in result.stdout
    for plots in (tmp_path / "one",):
        assert {p.name for p in plots.iterdir()} == PLOTS
        assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000 for p in plots.iterdir())
    # A summary-level run has no token-level plots.
    assert invoke("analyze", str(runs["summary"]), "--plots", str(tmp_path / "two")).exit_code == 0
    assert {p.name for p in (tmp_path / "two").iterdir()} == {"response_length.png", "log_weights.png"}


def test_compare(runs, tmp_path):
    result = invoke("compare", str(runs["kl"]), str(runs["fixed"]), str(runs["summary"]), "--json", "--plots", str(tmp_path))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    labels = [r["label"] for r in report["runs"]]
    assert labels == ["kl_symmetry (kl)", "fixed=0.3", "kl_symmetry (summary)"]
    fixed = report["runs"][1]
    assert fixed["fields"]["alpha"]["tokens"]["mean"] == pytest.approx(0.3) and fixed["checks"]["alpha_in_0.2_0.8"] == 1.0
    assert report["runs"][0]["fields"] == analyze_json(str(runs["kl"]))["fields"]
    assert {p.name for p in tmp_path.iterdir()} == PLOTS
    table = invoke("compare", str(runs["kl"]), str(runs["fixed"])).stdout
    assert "kl_symmetry" in table and "fixed=0.3" in table


def test_compare_says_when_runs_differ_in_more_than_alpha(runs, tmp_path):
    for suffix in (".jsonl", ".diagnostics.jsonl", ".meta.json"):
        (tmp_path / f"long{suffix}").write_bytes(runs["kl"].with_name(f"kl{suffix}").read_bytes())
    meta = json.loads((tmp_path / "long.meta.json").read_text())
    meta["config"]["max_new_tokens"] = 64
    (tmp_path / "long.meta.json").write_text(json.dumps(meta))
    result = invoke("compare", str(runs["kl"]), str(tmp_path / "long.diagnostics.jsonl"))
    assert result.exit_code == 0 and "note: the runs differ in more than their alpha method (max_new_tokens 24, 64)" in result.stderr
    assert "note:" not in invoke("compare", str(runs["kl"]), str(runs["fixed"])).stderr


def test_acceptance_of_a_speculative_run_where_users_look(runs, tmp_path):
    lines, _ = raw(runs["speculative"])
    rounds = sum(len(r["draft_lengths"]) for r in lines)
    accepted = sum(t - 1 for r in lines for t in r["round_tokens"])
    tested = sum(min(t, d) for r in lines for t, d in zip(r["round_tokens"], r["draft_lengths"]))
    assert 0 < accepted < tested, "some drafts accepted and some rejected"
    spec = analyze_json(str(runs["speculative"]))["speculative"]
    assert spec["rounds"] == rounds and spec["samples"] == len(lines)
    assert spec["acceptance_rate"] == pytest.approx(accepted / tested)
    assert spec["tokens_per_round"] == pytest.approx(sum(r["num_tokens"] for r in lines) / rounds)
    assert spec["drafts_per_round"] == pytest.approx(sum(map(sum, (r["draft_lengths"] for r in lines))) / rounds)
    # The manifest counts one more accepted draft for a sample whose EOS was an accepted draft.
    session = orjson.loads(runs["speculative"].with_name("speculative.meta.json").read_bytes())["sessions"][-1]["speculative"]
    stops = sum(r["finish_reason"] == "stop" for r in lines)
    assert accepted / tested <= session["acceptance_rate"] + 1e-4 <= (accepted + stops) / tested + 2e-4
    assert analyze_json(str(runs["kl"]))["speculative"] is None

    table = invoke("analyze", str(runs["speculative"])).stdout
    assert fmt(accepted / tested) in table and "draft acceptance rate" in table and "tokens per round" in table
    compared = invoke("compare", str(runs["kl"]), str(runs["speculative"])).stdout
    assert "draft acceptance rate" in compared and fmt(accepted / tested) in compared
    report = tmp_path / "report.html"
    assert invoke("report", str(runs["speculative"].with_name("speculative.jsonl")), "--output", str(report)).exit_code == 0
    html = report.read_text()
    assert "draft acceptance" in html and fmt(accepted / tested) in html


def test_missing_file_and_bad_floor(tmp_path, runs):
    result = invoke("analyze", str(tmp_path / "nope.diagnostics.jsonl"))
    assert result.exit_code == 2 and "diagnostics file not found" in result.output
    result = invoke("analyze", str(runs["kl"]), "--export-weights", str(tmp_path / "w.jsonl"), "--ess-floor", "0")
    assert result.exit_code == 2 and "--ess-floor" in result.output


@pytest.mark.parametrize("spread", [0.1, 2.0, 6.0])
def test_gamma_is_the_largest_meeting_the_floor(spread):
    log_w = np.random.default_rng(0).normal(0.0, spread, 500) - 40.0
    gamma = choose_gamma(log_w, 0.3)
    assert ess_ratio(gamma * log_w) >= 0.3
    if gamma < 1.0:
        assert ess_ratio(min(gamma + 1e-9, 1.0) * log_w) < 0.3
    else:
        assert spread == 0.1 and ess_ratio(log_w) >= 0.3
    weights = tempered_weights(log_w, gamma)
    assert weights.mean() == pytest.approx(1.0)
    assert weights.sum() ** 2 / (len(weights) * (weights**2).sum()) == pytest.approx(ess_ratio(gamma * log_w))


def test_export_weights(runs, tmp_path):
    out = tmp_path / "weights.jsonl"
    result = invoke("analyze", str(runs["kl"]), "--export-weights", str(out), "--ess-floor", "0.5")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    lines, _ = raw(runs["kl"])
    assert [r["sample_idx"] for r in records] == [r["sample_idx"] for r in lines]
    assert [r["log_w"] for r in records] == pytest.approx([r["logp_theta_sum"] - r["logp_q_sum"] for r in lines])
    gamma = records[0]["gamma"]
    assert gamma == choose_gamma(np.array([r["log_w"] for r in records]), 0.5)
    weights = np.array([r["weight"] for r in records])
    assert weights.mean() == pytest.approx(1.0)
    assert weights.sum() ** 2 / (len(weights) * (weights**2).sum()) >= 0.5 - 1e-9


def test_reservoir_is_a_uniform_sample_of_whole_rows():
    rows = np.stack([np.arange(20_000.0), -np.arange(20_000.0)], axis=1)
    reservoir = TokenReservoir(("a", "b"), size=2_000, seed=1)
    for chunk in np.array_split(rows, 37):
        reservoir.add(chunk)
    assert reservoir.rows.shape == (2_000, 2)
    assert np.array_equal(reservoir.column("b"), -reservoir.column("a"))  # rows stay whole
    assert len(np.unique(reservoir.column("a"))) == 2_000
    # Uniform: each tenth of the stream holds about a tenth of the sample (chi-square, 9 dof).
    counts = np.histogram(reservoir.column("a"), bins=10, range=(0, 20_000))[0]
    assert ((counts - 200) ** 2 / 200).sum() < 27.9  # p = 0.001


def test_analysis_streams_a_large_sidecar(tmp_path):
    """Memory stays far below the file size: arrays are folded in line by line."""
    rng = np.random.default_rng(0)
    path = tmp_path / "big.diagnostics.jsonl"
    tokens = 400
    with open(path, "wb") as f:
        for i in range(800):
            per_token = {name: rng.random(tokens).tolist() for name in SUMMARY_FIELDS}
            record = {"sample_idx": i, "num_tokens": tokens, "finish_reason": "length", "logp_theta_sum": -1.0, "logp_q_sum": -2.0}
            record.update({f"{n}_{s}": 0.5 for n in SUMMARY_FIELDS for s in ("mean", "std", "min", "max")})
            f.write(orjson.dumps({**record, "per_token": {"token_id": [1] * tokens, **per_token}}) + b"\n")
    size = path.stat().st_size
    tracemalloc.start()
    run = analyze_sidecar(path, reservoir_size=20_000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert run.samples == 800 and run.tokens == 320_000
    assert peak < size / 10, (peak, size)


def test_non_finite_log_weights_are_counted_and_left_out_of_plots(runs, tmp_path):
    """A sequence log-weight of +inf (two finite sums whose difference overflows) crashed the plots."""
    lines = [orjson.loads(line) for line in open(runs["kl"], "rb")]
    lines[1].update(logp_theta_sum=1e308, logp_q_sum=-1e308)
    sidecar = tmp_path / "inf.diagnostics.jsonl"
    sidecar.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in lines))
    result = invoke("analyze", str(sidecar), "--json", "--plots", str(tmp_path / "plots"))
    assert result.exit_code == 0, result.output
    weights = json.loads(result.stdout)["weights"]
    assert weights["non_finite"] == 1 and weights["log_w"]["max"] < 1e300
    assert {p.name for p in (tmp_path / "plots").iterdir()} == PLOTS


def test_a_full_disk_while_plotting_is_a_run_error(runs, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "plots" / "alpha_histogram.png"))

    monkeypatch.setattr(Figure, "savefig", full)
    result = invoke("analyze", str(runs["kl"]), "--plots", str(tmp_path / "plots"))
    assert result.exit_code == 1 and result.stderr.splitlines() == [
        f"error: cannot read or write {tmp_path / 'plots' / 'alpha_histogram.png'}: No space left on device"
    ]
    unwritable = invoke("explain", "--output", "/proc/qstar-figures")
    assert unwritable.exit_code == 2 and unwritable.stderr.splitlines() == [
        "error: --output /proc/qstar-figures cannot be written: No such file or directory"
    ]
