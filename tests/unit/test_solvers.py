"""DPM-Solver++(2M) on problems with known solutions: a point mass (every solver exact) and
Gaussian data (first order converges at rate 1, the multistep method at rate 2)."""

from __future__ import annotations

import math

import pytest
import torch

from dpok.core import dpm_solver_pp_step, half_log_snr

S2 = 0.25  # data variance of the Gaussian problem


def gaussian_x0(x: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
    """E[x_0 | x_t] for x_0 ~ N(0, S2 I) and x_t = alpha x_0 + sigma eps."""
    return alpha * S2 * x / (alpha**2 * S2 + sigma**2)


def solve(times: list[tuple[float, float]], x: torch.Tensor, predict, second: bool) -> torch.Tensor:  # noqa: ANN001
    d_prev, prev = None, None
    for s, t in zip(times[:-1], times[1:]):
        d = predict(x, *s)
        x = dpm_solver_pp_step(x, d, s, t, d_prev if second else None, prev if second else None)
        d_prev, prev = d, s
    return x


def vp_times(n: int) -> list[tuple[float, float]]:
    """n steps uniform in lambda from -3 to 2, as (sqrt(abar), sqrt(1 - abar))."""
    lams = torch.linspace(-3.0, 2.0, n + 1).double().tolist()
    return [(math.sqrt(1 / (1 + math.exp(-2 * v))), math.sqrt(1 / (1 + math.exp(2 * v)))) for v in lams]


def flow_times(n: int) -> list[tuple[float, float]]:
    """n steps uniform in t from 1 (pure noise) to 0.05, as (1 - t, t)."""
    return [(1.0 - t, t) for t in torch.linspace(1.0, 0.05, n + 1).double().tolist()]


def exact(x: torch.Tensor, times: list[tuple[float, float]]) -> torch.Tensor:
    """The probability-flow ODE of Gaussian data scales x by the ratio of marginal stds."""
    std = [math.sqrt(a**2 * S2 + s**2) for a, s in (times[0], times[-1])]
    return x * std[1] / std[0]


@pytest.mark.parametrize("frame", [vp_times, flow_times])
def test_first_order_converges_at_rate_one_and_the_multistep_method_at_rate_two(frame) -> None:  # noqa: ANN001
    x = torch.tensor([1.3, -0.4], dtype=torch.float64)
    err = {(n, o): (solve(frame(n), x, gaussian_x0, o) - exact(x, frame(n))).abs().max().item()
           for n in (40, 80, 160) for o in (False, True)}
    for n in (40, 80):
        assert 1.8 < err[(n, False)] / err[(2 * n, False)] < 2.2
        assert 3.4 < err[(n, True)] / err[(2 * n, True)] < 4.6
    assert err[(40, True)] < err[(40, False)] / 5


@pytest.mark.parametrize("second", [False, True])
def test_a_point_mass_is_solved_exactly_at_any_step_size(second: bool) -> None:
    """D(x_t) = c for data at c: both orders keep x_t = alpha_t c + sigma_t eps, and end at c."""
    c, eps = torch.tensor([0.7, -1.1]), torch.tensor([0.3, 2.0])
    for times in (vp_times(3), flow_times(4) + [(1.0, 0.0)]):
        x = times[0][0] * c + times[0][1] * eps
        out = solve(times, x, lambda x, a, s: c.clone(), second)
        a, s = times[-1]
        torch.testing.assert_close(out, a * c + s * eps)


def test_the_first_order_step_is_ddim_and_euler() -> None:
    x, d = torch.tensor([0.5, -2.0]), torch.tensor([1.0, 0.25])
    # DDIM, eta 0: x_t = alpha_t D + sigma_t (x_s - alpha_s D) / sigma_s
    s, t = (0.6, 0.8), (0.8, 0.6)
    torch.testing.assert_close(dpm_solver_pp_step(x, d, s, t), t[0] * d + t[1] * (x - s[0] * d) / s[1])
    # rectified flow from t = 1 (alpha 0) to 0.7: Euler x + (0.7 - 1) v with v = (x - D) / 1
    torch.testing.assert_close(dpm_solver_pp_step(x, d, (0.0, 1.0), (0.3, 0.7)), x - 0.3 * (x - d))
    # a previous prediction at pure noise (lambda = -inf) leaves the step of first order
    torch.testing.assert_close(dpm_solver_pp_step(x, d, s, t, d_prev=-d, prev=(0.0, 1.0)),
                               dpm_solver_pp_step(x, d, s, t))
    assert half_log_snr(0.0, 1.0) == -math.inf and half_log_snr(1.0, 0.0) == math.inf
    with pytest.raises(ValueError, match="less noisy"):
        dpm_solver_pp_step(x, d, t, s)
