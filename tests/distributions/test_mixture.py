"""The q* math core against float64 references."""

import math

import pytest
import torch

from qstar_cli.distributions import mixture
from qstar_cli.distributions.mixture import (
    DEGENERATE_VAR,
    entropy,
    mixture_logprobs,
    solve_alpha,
    token_diagnostics,
)


def reference_alpha(logp_theta, logp_t, iters=60):
    """Float64 bisection of F on the common support to ~1e-18, plus the variance of d at the root."""
    a, b = logp_theta.double(), logp_t.double()
    common = torch.isfinite(a) & torch.isfinite(b)
    d = torch.where(common, b - a, 0.0)
    bm = torch.where(common, b, -math.inf)
    lo = torch.zeros(a.shape[0], dtype=torch.float64)
    hi = torch.ones_like(lo)
    for _ in range(iters):
        mid = (lo + hi) / 2
        q = torch.softmax(bm - mid[:, None] * d, -1)
        f = (q * d).sum(-1)
        lo, hi = torch.where(f > 0, mid, lo), torch.where(f > 0, hi, mid)
    alpha = (lo + hi) / 2
    q = torch.softmax(bm - alpha[:, None] * d, -1)
    var = (q * d * d).sum(-1) - (q * d).sum(-1) ** 2
    return alpha, var


def make_rows(kind, n, vocab, gen):
    def randn(scale):
        return torch.randn(n, vocab, generator=gen) * scale

    if kind == "lm":  # correlated, LM-like logits
        z = randn(3.0)
        return (z + randn(1.0)).log_softmax(-1), (1.5 * z + randn(1.0)).log_softmax(-1)
    if kind == "independent":
        return randn(3.0).log_softmax(-1), randn(3.0).log_softmax(-1)
    if kind == "peaked":  # sharp and disagreeing
        z = randn(8.0)
        return (z + randn(4.0)).log_softmax(-1), randn(8.0).log_softmax(-1)
    if kind == "very_peaked":  # almost all mass on one token, different tokens
        a = randn(1.0) - 40.0
        b = randn(1.0) - 40.0
        a[:, 0] = 0.0
        b[:, 1] = 0.0
        return a.log_softmax(-1), b.log_softmax(-1)
    if kind == "close":  # near-identical but not degenerate
        z = randn(3.0)
        return z.log_softmax(-1), (z + randn(0.05)).log_softmax(-1)
    if kind == "identical":
        z = randn(3.0).log_softmax(-1)
        return z, z.clone()
    if kind == "masked":  # both models cannot emit a shared set of padded ids
        a, b = make_rows("lm", n, vocab, gen)
        a[:, vocab // 2 :] = -math.inf
        b[:, vocab // 2 :] = -math.inf
        return a.log_softmax(-1), b.log_softmax(-1)
    if kind == "partial_support":  # each model has tokens the other cannot emit
        a, b = make_rows("lm", n, vocab, gen)
        a[:, : vocab // 4] = -math.inf
        b[:, -vocab // 4 :] = -math.inf
        return a.log_softmax(-1), b.log_softmax(-1)
    raise ValueError(kind)


KINDS = ["lm", "independent", "peaked", "very_peaked", "close", "identical", "masked", "partial_support"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("vocab", [2, 3, 50, 4096])
def test_kl_symmetry_matches_float64_reference(kind, vocab):
    gen = torch.Generator().manual_seed(1000 * KINDS.index(kind) + vocab)
    logp_theta, logp_t = make_rows(kind, 500, vocab, gen)
    alpha = solve_alpha(logp_theta, logp_t)  # float32, default settings
    ref, var = reference_alpha(logp_theta, logp_t)
    assert alpha.dtype == torch.float32 and alpha.shape == (500,)
    assert torch.isfinite(alpha).all() and ((alpha >= 0) & (alpha <= 1)).all()
    regular = var > 10 * DEGENERATE_VAR
    degenerate = var < DEGENERATE_VAR / 10
    err = (alpha.double() - ref).abs()
    assert (err[regular] <= 1e-4).all(), (kind, err[regular].max())
    assert (alpha[degenerate] == 0.5).all()
    if kind in ("identical",):
        assert degenerate.all()
    if kind in ("lm", "independent", "peaked", "very_peaked", "close") and vocab >= 50:
        assert regular.float().mean() > 0.9, "the case must exercise the solver, not the fallback"


@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("kind", KINDS)
def test_stopping_once_no_row_moves_is_bit_identical_to_every_iteration(kind, rows, monkeypatch):
    gen = torch.Generator().manual_seed(7 * rows + KINDS.index(kind))
    logp_theta, logp_t = make_rows(kind, rows, 512, gen)
    early = solve_alpha(logp_theta, logp_t)
    monkeypatch.setattr(mixture, "EARLY_EXIT_DEVICES", ())  # as on an accelerator: every iteration runs
    assert torch.equal(early, solve_alpha(logp_theta, logp_t))


def test_the_round_mathematics_compile_whole():
    """No graph breaks (``fullgraph`` raises on one): compiled, each function is one graph, which on
    an accelerator is a few fused kernels rather than pieces with Python between them."""
    logp_theta, logp_t = make_rows("lm", 5, 512, torch.Generator().manual_seed(0))
    with torch.inference_mode():
        alpha = torch.compile(solve_alpha, fullgraph=True, dynamic=True)(logp_theta, logp_t)
        logp_q = torch.compile(mixture_logprobs, fullgraph=True, dynamic=True)(logp_theta, logp_t, alpha)
        torch.compile(token_diagnostics, fullgraph=True, dynamic=True)(logp_theta, logp_t, logp_q)
    torch.testing.assert_close(alpha, solve_alpha(logp_theta, logp_t), rtol=0, atol=1e-5)


def test_mirror_distribution_gives_one_half():
    # pi_t(y) = pi_theta(1 - y) on V = 2: the mixture is symmetric, alpha* = 1/2.
    p = torch.rand(1000, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.98 + 0.01
    logp_theta = torch.stack([p.log(), (1 - p).log()], -1)
    logp_t = logp_theta.flip(-1)
    alpha = solve_alpha(logp_theta, logp_t)
    nondegenerate = (p - 0.5).abs() > 1e-3
    assert torch.allclose(alpha[nondegenerate], torch.full_like(alpha[nondegenerate], 0.5), atol=1e-9)


def test_root_balances_the_two_kls_in_float64():
    gen = torch.Generator().manual_seed(2)
    logp_theta, logp_t = (x.double() for x in make_rows("lm", 300, 1000, gen))
    alpha = solve_alpha(logp_theta, logp_t, tol=1e-12, max_iter=8)
    diag = token_diagnostics(logp_theta, logp_t, mixture_logprobs(logp_theta, logp_t, alpha))
    q = mixture_logprobs(logp_theta, logp_t, alpha).exp()
    f = (q * (logp_t - logp_theta)).sum(-1)
    assert f.abs().max() < 1e-10
    assert (diag["kl_theta"] - diag["kl_t"]).abs().max() < 1e-10
    # At the root both KLs equal -log Z_alpha* (the Chernoff point).
    log_z = torch.logsumexp(alpha[:, None] * logp_theta + (1 - alpha[:, None]) * logp_t, -1)
    assert torch.allclose(diag["kl_theta"], -log_z, atol=1e-10)


def test_F_is_monotone_and_spans_the_two_kls():
    gen = torch.Generator().manual_seed(3)
    logp_theta, logp_t = (x.double() for x in make_rows("independent", 50, 300, gen))
    grid = torch.linspace(0, 1, 101, dtype=torch.float64)
    fs = []
    for w in grid:
        q = mixture_logprobs(logp_theta, logp_t, torch.full((50,), w.item(), dtype=torch.float64)).exp()
        fs.append((q * (logp_t - logp_theta)).sum(-1))
    fs = torch.stack(fs, -1)
    assert (fs.diff(dim=-1) <= 1e-12).all()
    p_theta, p_t = logp_theta.exp(), logp_t.exp()
    assert torch.allclose(fs[:, 0], (p_t * (logp_t - logp_theta)).sum(-1))  # KL(pi_t || pi_theta)
    assert torch.allclose(fs[:, -1], -(p_theta * (logp_theta - logp_t)).sum(-1))  # -KL(pi_theta || pi_t)


def test_endpoints_are_exactly_the_two_models_even_with_minus_inf():
    gen = torch.Generator().manual_seed(4)
    logp_theta, logp_t = make_rows("partial_support", 20, 64, gen)
    assert torch.equal(mixture_logprobs(logp_theta, logp_t, torch.zeros(20)), logp_t)
    assert torch.equal(mixture_logprobs(logp_theta, logp_t, torch.ones(20)), logp_theta)
    middle = mixture_logprobs(logp_theta, logp_t, torch.full((20,), 0.3))
    assert not middle.isnan().any()
    assert torch.allclose(middle.exp().sum(-1), torch.ones(20))
    off_common = ~(torch.isfinite(logp_theta) & torch.isfinite(logp_t))
    assert (middle[off_common] == -math.inf).all()


def test_disjoint_support_falls_back_to_the_target_without_nan():
    logp_theta = torch.tensor([[0.0, -math.inf, -math.inf], [math.log(0.5), math.log(0.5), -math.inf]])
    logp_t = torch.tensor([[-math.inf, math.log(0.5), math.log(0.5)], [-math.inf, -math.inf, 0.0]])
    for method in ("kl_symmetry", "entropy", "fixed"):
        alpha = solve_alpha(logp_theta, logp_t, method=method)
        logp_q = mixture_logprobs(logp_theta, logp_t, alpha)
        assert not logp_q.isnan().any()
        assert torch.allclose(logp_q.exp().sum(-1), torch.ones(2))
    assert torch.equal(solve_alpha(logp_theta, logp_t), torch.zeros(2))


def test_root_at_an_end_point_stays_inside_the_common_support():
    # pi_theta has mass 0.5 on a token pi_t cannot emit, so d = log(pi_t / pi_theta) > 0 on the
    # whole common support, F > 0 on (0, 1), and the root is the end point 1, approached from inside.
    logp_t = torch.tensor([[math.log(0.25), math.log(0.75), -math.inf]])
    logp_theta = torch.tensor([[math.log(0.1), math.log(0.4), math.log(0.5)]])
    alpha = solve_alpha(logp_theta, logp_t)
    assert alpha.item() == pytest.approx(1.0, abs=2e-6) and alpha.item() < 1.0
    diag = token_diagnostics(logp_theta, logp_t, mixture_logprobs(logp_theta, logp_t, alpha))
    assert all(torch.isfinite(v).all() for v in diag.values())


@pytest.mark.parametrize("kind", KINDS)
def test_no_nan_anywhere(kind):
    gen = torch.Generator().manual_seed(5)
    logp_theta, logp_t = make_rows(kind, 200, 257, gen)
    for method in ("kl_symmetry", "entropy", "fixed"):
        alpha = solve_alpha(logp_theta, logp_t, method=method, alpha=0.3)
        logp_q = mixture_logprobs(logp_theta, logp_t, alpha)
        diag = token_diagnostics(logp_theta, logp_t, logp_q)
        assert torch.isfinite(alpha).all()
        assert not logp_q.isnan().any() and (logp_q < math.inf).all()
        for name, value in diag.items():
            assert not value.isnan().any(), (kind, method, name)
            if kind != "partial_support" or name != "ess_ratio":
                assert torch.isfinite(value).all(), (kind, method, name)
        if kind == "partial_support":
            # q lives on the common support, so each model's mass outside it has infinite weight.
            assert (diag["ess_theta"] == 0).all() and (diag["ess_t"] == 0).all()


def test_entropy_method():
    gen = torch.Generator().manual_seed(6)
    logp_theta, logp_t = (x.double() for x in make_rows("masked", 100, 64, gen))
    h_theta = -(logp_theta.exp() * logp_theta.nan_to_num(neginf=0.0)).sum(-1)
    h_t = -(logp_t.exp() * logp_t.nan_to_num(neginf=0.0)).sum(-1)
    assert torch.allclose(entropy(logp_theta), h_theta)
    alpha = solve_alpha(logp_theta, logp_t, method="entropy")
    assert torch.allclose(alpha, h_theta / (h_theta + h_t))
    one_hot = torch.tensor([[0.0, -math.inf]])
    assert solve_alpha(one_hot, one_hot, method="entropy").item() == 0.5


def test_fixed_method_and_bad_arguments():
    x = torch.zeros(3, 4).log_softmax(-1)
    assert torch.equal(solve_alpha(x, x, method="fixed", alpha=0.25), torch.full((3,), 0.25))
    with pytest.raises(ValueError, match="unknown alpha method 'bisect'"):
        solve_alpha(x, x, method="bisect")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        solve_alpha(x, x, method="fixed", alpha=1.5)


def test_diagnostics_against_explicit_float64_formulas():
    gen = torch.Generator().manual_seed(7)
    logp_theta, logp_t = (x.double() for x in make_rows("lm", 64, 500, gen))
    alpha = torch.rand(64, generator=gen, dtype=torch.float64)
    logp_q = mixture_logprobs(logp_theta, logp_t, alpha)
    diag = token_diagnostics(logp_theta, logp_t, logp_q)
    p_theta, p_t, q = logp_theta.exp(), logp_t.exp(), logp_q.exp()
    assert torch.allclose(diag["kl_theta"], (q * (q.log() - p_theta.log())).sum(-1))
    assert torch.allclose(diag["kl_t"], (q * (q.log() - p_t.log())).sum(-1))
    assert torch.allclose(diag["ess_theta"], 1 / (p_theta**2 / q).sum(-1))
    assert torch.allclose(diag["ess_t"], 1 / (p_t**2 / q).sum(-1))
    assert torch.allclose(diag["ess_ratio"], diag["ess_theta"] / diag["ess_t"])
    assert torch.allclose(diag["entropy_q"], -(q * q.log()).sum(-1))

    # sum pi_theta^2 / q = Z_alpha * Z_(2 - alpha), sum pi_t^2 / q = Z_alpha * Z_(-alpha).
    def log_z(beta):
        return torch.logsumexp(beta[:, None] * logp_theta + (1 - beta[:, None]) * logp_t, -1)

    assert torch.allclose(-diag["ess_theta"].log(), log_z(alpha) + log_z(2 - alpha))
    assert torch.allclose(-diag["ess_t"].log(), log_z(alpha) + log_z(-alpha))


def test_the_sidecar_fields_are_the_diagnostics_in_order():
    from qstar_cli.runfiles.format import DIAGNOSTIC_FIELDS, PER_TOKEN_FIELDS

    logp = torch.randn(2, 5).log_softmax(-1)
    assert tuple(token_diagnostics(logp, logp.flip(-1), logp)) == DIAGNOSTIC_FIELDS
    assert PER_TOKEN_FIELDS == ("token_id", "alpha", "logp_theta", "logp_t", "logp_q", *DIAGNOSTIC_FIELDS)
