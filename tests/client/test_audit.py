"""The one-run privacy audit (client.audit): its lower bound, and the audit of a site's DP round.

The bound is checked against cases worked by hand, against the two values Steinke, Nasr and
Jagielski print (arXiv:2305.08846v1, Appendix D and Section 7), and against the pure-epsilon
binomial argument it refines. The audit trains real rounds through the site's DP machinery at an
accounted epsilon of 1: the real settings must pass (lower bound below 1), the noise switched off
and the noise seeded from the round must be caught (lower bound above 1).

    pytest tests/client/test_audit.py -s      # -s prints the measured bounds
"""

from __future__ import annotations

import argparse
import math

import pytest

from client.audit import MODES, AuditSettings, audit_round, epsilon_lower_bound
from common.privacy import derive_noise_multiplier
from server import audit_cli

BETA = 0.05


def _pure_all_correct(r: int, beta: float = BETA) -> float:
    """delta = 0, all r guesses right: P[Binomial(r, q) >= r] = q^r < beta iff q > beta^(1/r), and
    q = e^eps / (1 + e^eps), so eps = logit(beta^(1/r))."""
    q = beta ** (1 / r)
    return math.log(q / (1 - q))


def test_the_bound_reproduces_the_values_the_paper_prints():
    assert epsilon_lower_bound(1000, 100, 75, delta=1e-4, beta=0.05) == pytest.approx(0.673, abs=1e-3)
    assert epsilon_lower_bound(100_000, 1510, 1439, delta=1e-5, beta=0.05) == pytest.approx(2.6758, abs=1e-3)


@pytest.mark.parametrize("r", [10, 100, 1000])
def test_guesses_no_better_than_chance_prove_nothing(r):
    assert epsilon_lower_bound(1000, r, r // 2, delta=1e-5) == 0.0
    assert epsilon_lower_bound(1000, r, 0, delta=1e-5) == 0.0
    # 1000 fair coins give 526 heads or more with probability ~5%: 520 is still chance
    assert epsilon_lower_bound(1000, 1000, 520, delta=1e-5) == 0.0


def test_all_correct_proves_more_the_more_guesses():
    bounds = [epsilon_lower_bound(1000, r, r, delta=1e-5) for r in (10, 30, 100, 300, 1000)]
    print("all correct, r = 10..1000:", [f"{b:.3f}" for b in bounds])

    assert all(a < b for a, b in zip(bounds, bounds[1:], strict=False))
    assert bounds[0] > 0.5 and bounds[-1] > 5.0


@pytest.mark.parametrize("r", [10, 100, 1000])
def test_delta_zero_is_the_pure_binomial_tail(r):
    assert epsilon_lower_bound(1000, r, r, delta=0.0) == pytest.approx(_pure_all_correct(r), abs=1e-6)


@pytest.mark.parametrize(
    ("m", "r", "v"), [(1000, 100, 75), (1000, 400, 383), (1000, 1000, 1000), (10**5, 1510, 1439)]
)
def test_delta_only_weakens_the_pure_binomial_bound(m, r, v):
    pure = epsilon_lower_bound(m, r, v, delta=0.0)
    with_delta = epsilon_lower_bound(m, r, v, delta=1e-5)

    assert with_delta <= pure
    # and delta is counted: 2 m delta large enough costs a visible share of the bound
    assert epsilon_lower_bound(m, r, v, delta=1e-3) < pure - 0.01


def test_delta_too_large_for_the_canaries_proves_nothing():
    # 2 m delta = 2 > beta: no count of correct guesses can reject, whatever the eps
    assert epsilon_lower_bound(1000, 1000, 1000, delta=1e-3) < _pure_all_correct(1000)
    assert epsilon_lower_bound(100_000, 1000, 1000, delta=1e-3) == 0.0


def test_the_bound_grows_with_the_correct_guesses():
    bounds = [epsilon_lower_bound(1000, 200, v, delta=1e-5) for v in range(100, 201)]

    assert all(a <= b for a, b in zip(bounds, bounds[1:], strict=False))
    assert bounds[0] == 0.0 and bounds[-1] > bounds[90] > bounds[50] > 0


# ----------------------------------------------------------------------------- the audit of a round

SETTINGS = AuditSettings(epsilon=1.0, canaries=1000, steps=8, sample_rate=0.25)


@pytest.fixture(scope="module")
def audits():
    results = {mode: audit_round(mode, SETTINGS) for mode in MODES}
    for r in results.values():
        print(
            f"{r.mode:<9} accounted eps {r.epsilon:.3f}  lower bound {r.lower_bound:.3f} "
            f"(v={r.v}/r={r.r}, m={r.m})  {r.seconds:.1f}s"
        )
    return results


def test_every_mode_is_accounted_at_epsilon_one(audits):
    configured = derive_noise_multiplier(target_epsilon=1.0, delta=1e-5, sample_rate=0.25, steps_total=8)
    for result in audits.values():
        assert 0.98 <= result.epsilon <= 1.0, result
        assert result.steps == 8 and result.m == 1000
        # the accountant counts the configured noise, also where the bug adds none
        assert result.noise_multiplier == pytest.approx(configured) and configured > 1.0


def test_the_real_machinery_passes(audits):
    result = audits["secret"]

    assert result.lower_bound < 1.0, result
    assert result.passed


def test_the_audit_catches_the_noise_switched_off(audits):
    result = audits["no-noise"]

    assert result.lower_bound > 1.0, result
    assert not result.passed


def test_the_audit_catches_noise_seeded_from_the_round(audits):
    result = audits["seeded"]

    assert result.lower_bound > 1.0, result
    assert not result.passed


def test_fedward_audit_exits_0_when_it_catches_the_broken_machinery(capsys):
    parser = argparse.ArgumentParser(prog="fedward")
    audit_cli.add_arguments(parser.add_subparsers().add_parser("audit"))
    args = parser.parse_args(["audit", "--mode", "no-noise", "--canaries", "500", "--steps", "8"])

    status = args.func(args, None)
    out = capsys.readouterr().out
    print(out)

    assert status == 0
    assert "no-noise" in out and "FAILED (lower bound > accounted): as it must" in out


def test_steps_must_be_whole_epochs():
    with pytest.raises(ValueError, match="multiple of 4"):
        AuditSettings(steps=6, sample_rate=0.25)
