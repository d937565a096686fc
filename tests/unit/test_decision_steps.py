"""benchmarks/decision_steps.py: the share of an outcome fixed by the state, on hand-made outcomes."""

from __future__ import annotations

import numpy as np
import pytest

from tests.benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("decision_steps")


def test_a_state_that_decides_alone_fixes_all_of_the_outcome(bench) -> None:
    outcomes = np.repeat(np.array([[1], [0], [1], [1], [0], [0]]), 8, axis=1)
    assert bench.state_share(outcomes) == pytest.approx(1.0)


def test_continuations_independent_of_the_state_fix_none_of_it(bench) -> None:
    rng = np.random.default_rng(0)
    outcomes = (rng.random((4000, 8)) < 0.6).astype(float)
    assert bench.state_share(outcomes) == pytest.approx(0.0, abs=0.02)


def test_a_half_decided_outcome_gives_the_intra_class_correlation(bench) -> None:
    # half the states always succeed or always fail (p 1 or 0), the rest are coin flips (p 1/2)
    rng = np.random.default_rng(1)
    g = 20000
    p = np.where(rng.random(g) < 0.5, rng.integers(0, 2, g).astype(float), 0.5)
    outcomes = (rng.random((g, 8)) < p[:, None]).astype(float)
    # total variance 1/4; within = E[p(1-p)] = 1/8; between = Var(p) = 1/8: half of it fixed by the state
    assert bench.state_share(outcomes) == pytest.approx(0.5, abs=0.02)


def test_no_variance_and_too_few_continuations(bench) -> None:
    assert np.isnan(bench.state_share(np.ones((5, 4))))
    with pytest.raises(ValueError, match="at least 2"):
        bench.state_share(np.ones((5, 1)))


def test_the_bootstrap_error_shrinks_with_more_states(bench) -> None:
    rng = np.random.default_rng(2)

    def draw(g: int) -> np.ndarray:
        p = np.where(rng.random(g) < 0.5, rng.integers(0, 2, g).astype(float), 0.5)
        return (rng.random((g, 8)) < p[:, None]).astype(float)

    few, many = bench.state_share_se(draw(32)), bench.state_share_se(draw(512))
    assert 0 < many < few < 0.3
    assert np.isnan(bench.state_share_se(np.ones((6, 4))))
