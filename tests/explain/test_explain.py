"""qstar explain: closed-form alpha* against the notes' table and hand-derived values, the grid solver, the files."""

import json
import math

import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgb
from matplotlib.image import imread
from typer.testing import CliRunner

from qstar_cli.cli import app
from qstar_cli.distributions.mixture import mixture_logprobs, token_diagnostics
from qstar_cli.explain.cases import (
    CASES,
    GaussianCase,
    Grid,
    explain_cases,
    gaussians,
    geometric_mixture,
    grid_logprobs,
)
from qstar_cli.explain.plots import (
    BEHAVIOR_PNG,
    EVOLUTION_PNG,
    Q_COLOR,
    T_COLOR,
    THETA_COLOR,
)

#: The background notes' table (problem 2): case index in CASES -> alpha*, KL(theta||t), KL(t||theta).
NOTES_TABLE = {
    0: (0.500, 8.000, 8.000),
    1: (0.388, 0.636, 1.614),
    2: (0.500, 1.125, 1.125),
    3: (0.298, 1.775, 11.292),
    4: (0.344, 2.886, 10.614),
}
#: Cases with equal means and isotropic covariances: case index -> precision ratio r = var_t / var_theta.
ISOTROPIC_CENTRED = {1: 4.0, 3: 15.0, 5: 0.25}


@pytest.fixture(scope="module")
def explanation():
    return explain_cases()


def test_the_notes_table_is_reproduced(explanation):
    for case, (alpha, kl_theta_t, kl_t_theta) in NOTES_TABLE.items():
        assert explanation.alpha_star[case].item() == pytest.approx(alpha, abs=1e-3), CASES[case].name
        assert explanation.kl_theta_t[case].item() == pytest.approx(kl_theta_t, abs=1e-2), CASES[case].name
        assert explanation.kl_t_theta[case].item() == pytest.approx(kl_t_theta, abs=1e-2), CASES[case].name


def test_closed_form_equals_hand_derived_values(explanation):
    # Equal means, isotropic 2-D, precisions l_theta = r * l_t: q* has precision l_q = l_theta * (1 - 1/r) / ln r
    # (where KL(q||theta) = KL(q||t)), so alpha* = 1/ln r - 1/(r - 1); KL(theta||t) = 1/r - 1 + ln r and
    # KL(q||theta) = l_theta/l_q - 1 - ln(l_theta/l_q) (per-dimension halves, two dimensions).
    for case, r in ISOTROPIC_CENTRED.items():
        ratio = r * math.log(r) / (r - 1)  # l_theta / l_q
        assert explanation.alpha_star[case].item() == pytest.approx(1 / math.log(r) - 1 / (r - 1), abs=1e-12)
        assert explanation.kl_theta_t[case].item() == pytest.approx(1 / r - 1 + math.log(r), rel=1e-12)
        assert explanation.kl_t_theta[case].item() == pytest.approx(r - 1 - math.log(r), rel=1e-12)
        assert explanation.kl_q[case].item() == pytest.approx(ratio - 1 - math.log(ratio), rel=1e-9)
    # Equal unit covariances, means 4 apart: q* = N(midpoint, I), KL = |2|^2 / 2 to it from either side.
    assert (explanation.alpha_star[0].item(), explanation.kl_q[0].item()) == pytest.approx((0.5, 2.0), abs=1e-12)


def test_grid_solver_agrees_with_the_closed_form_on_every_case(explanation):
    gap = (explanation.alpha_star - explanation.alpha_star_grid).abs()
    assert gap.max().item() < 1e-4, [(c.name, g) for c, g in zip(CASES, gap.tolist())]


def test_closed_form_mixture_and_kls_equal_the_products_on_the_grid(explanation):
    theta, t = gaussians()
    q_closed = grid_logprobs(geometric_mixture(theta, t, explanation.alpha_star), explanation.grid)
    q_product = mixture_logprobs(explanation.logp_theta, explanation.logp_t, explanation.alpha_star)
    held = q_closed > math.log(1e-12)  # where q* has mass (far tails differ only by float rounding)
    assert (q_closed - q_product)[held].abs().max().item() < 1e-9
    grid = token_diagnostics(explanation.logp_theta, explanation.logp_t, q_product)
    torch.testing.assert_close(grid["kl_theta"], explanation.kl_q, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(grid["kl_t"], explanation.kl_q, rtol=1e-7, atol=1e-9)


def test_swapping_the_models_mirrors_alpha_and_the_kls(explanation):
    swapped = tuple(GaussianCase(c.name, c.mu_t, c.cov_t, c.mu_theta, c.cov_theta) for c in CASES)
    mirror = explain_cases(swapped, Grid(half_width=10.0, step=0.1))
    torch.testing.assert_close(mirror.alpha_star, 1 - explanation.alpha_star, rtol=0, atol=1e-12)
    torch.testing.assert_close(mirror.kl_theta_t, explanation.kl_t_theta)
    torch.testing.assert_close(mirror.kl_q, explanation.kl_q)
    assert (mirror.alpha_star - mirror.alpha_star_grid).abs().max().item() < 1e-4


def colour_pixels(png, colour: str) -> int:
    """Pixels within a small distance of a named matplotlib colour."""
    rgb = imread(png)[..., :3]
    return int((np.abs(rgb - np.array(to_rgb(colour))).max(axis=-1) < 0.04).sum())


def test_command_prints_json_and_draws_both_figures(explanation, tmp_path):
    result = CliRunner().invoke(app, ["explain", "--output", str(tmp_path / "figs"), "--json"])
    assert result.exit_code == 0, result.output
    cases = json.loads(result.stdout)["cases"]
    assert [c["name"] for c in cases] == [c.name for c in CASES]
    assert cases == explanation.records()
    assert set(cases[0]) >= {"name", "alpha_star", "kl_theta_t", "kl_t_theta", "kl_q"}
    for name in (BEHAVIOR_PNG, EVOLUTION_PNG):
        png = tmp_path / "figs" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width, _ = imread(png).shape
        assert height > 400 and width > 1000
        # Not blank: the pi_theta, pi_t and q* contours are all drawn.
        for colour in (THETA_COLOR, T_COLOR, Q_COLOR):
            assert colour_pixels(png, colour) > 500, (name, colour)


def test_command_prints_the_table(tmp_path):
    result = CliRunner().invoke(app, ["explain", "--output", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = {line.split("  ")[0].strip(): line.split()[-5:] for line in result.stdout.splitlines() if "  0." in line}
    assert rows["theta narrow (sd 1), t wide (sd 2)"] == ["0.3880", "0.3880", "0.636", "1.614", "0.234"]
    assert rows["equal shapes, means 4 apart"] == ["0.5000", "0.5000", "8.000", "8.000", "2.000"]
    assert len(rows) == len(CASES)
    assert (tmp_path / BEHAVIOR_PNG).is_file() and (tmp_path / EVOLUTION_PNG).is_file()


def test_output_that_is_a_file_is_a_one_line_error(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("")
    result = CliRunner().invoke(app, ["explain", "--output", str(taken)])
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert str(taken) in line and "--output" in line
