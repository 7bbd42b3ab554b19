"""`fedward audit`: an empirical privacy audit of a site's DP-SGD round, which the machinery can fail.

    fedward audit                          # secret, no-noise and seeded, accounted epsilon 1, m = 1000
    fedward audit --mode secret --canaries 2000 --steps 16 --seed 3

Each mode trains one round of a small synthetic site through the site's real DP machinery with m
gradient canaries, then bounds epsilon from below from what the coordinator sees (client.audit:
Steinke, Nasr and Jagielski's one-run audit). It prints the round's accounted epsilon beside the
lower bound and its confidence: the machinery passes a mode when the lower bound does not exceed
the accounted epsilon. `secret` (the site's real settings) must pass; `no-noise` (noise switched off
but still accounted) and `seeded` (noise the coordinator can replay) must fail, i.e. be caught.
Exit status 0 when every mode run did what it must, 1 otherwise, 2 for options out of range.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from client.audit_settings import MODES, AuditSettings

if TYPE_CHECKING:  # client.audit imports torch and Opacus: only when an audit runs (run below)
    from client.audit import AuditResult

HELP = "audit a site's DP-SGD round with canaries: a lower bound on epsilon beside the accounted one"
EXPECT_PASS = {"secret": True, "no-noise": False, "seeded": False}  # what each mode must do


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `fedward audit`; also makes `run` the subcommand's function."""
    defaults = AuditSettings()
    parser.add_argument(
        "--epsilon", type=float, default=defaults.epsilon,
        help=f"the accounted epsilon of the audited round (at delta {defaults.delta:g}); the noise is "
        "derived from it (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--canaries",
        type=int,
        default=defaults.canaries,
        help="m, the number of canaries (default: %(default)s)",
    )
    parser.add_argument(
        "--steps", type=int, default=defaults.steps,
        help=f"DP-SGD steps of the round, a multiple of {round(1 / defaults.sample_rate)} (sample rate "
        f"{defaults.sample_rate}) (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--mode", choices=[*MODES, "all"], default="all",
        help="secret: the real machinery; no-noise: the noise switched off but accounted; seeded: noise "
        "the coordinator can replay; all: the three (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--seed", type=int, default=defaults.seed,
        help="the round's seed, which the coordinator knows (model, canaries, seeded noise) (default: %(default)s)",
    )  # fmt: skip
    parser.set_defaults(func=lambda args, console: run(args))


def verdict(result: AuditResult) -> str:
    """The line of one mode: accounted epsilon, lower bound, guesses, passed or failed, expected or not."""
    if result.passed:
        outcome = "passed (lower bound <= accounted)"
    else:
        outcome = "FAILED (lower bound > accounted)"
    expected = EXPECT_PASS[result.mode] == result.passed
    note = "as it must" if expected else ("NOT CAUGHT" if result.passed else "UNEXPECTED")
    return (
        f"{result.mode:<9} {result.epsilon:>9.3f}  {result.lower_bound:>11.3f}  "
        f"{result.v:>5}/{result.r:<5}  {outcome}: {note}  [{result.seconds:.0f}s]"
    )


def run(args: argparse.Namespace) -> int:
    """Run the audit in the chosen modes and print one line each; 0 when each did what it must."""
    from client.audit import audit_round  # torch and Opacus: only when an audit runs

    try:
        settings = AuditSettings(
            epsilon=args.epsilon, canaries=args.canaries, steps=args.steps, seed=args.seed
        )
    except ValueError as err:
        print(f"error: {err}")
        return 2
    modes = MODES if args.mode == "all" else (args.mode,)
    confidence = f"{100 * (1 - settings.beta):g}%"
    print(
        f"one DP-SGD round of a synthetic site ({settings.model}, {settings.train_size} images, "
        f"{settings.steps} steps at sample rate {settings.sample_rate}, clip {settings.max_grad_norm}), "
        f"m = {settings.canaries} canaries, delta = {settings.delta:g}; guesses tried: k = "
        f"{', '.join(f'{g:g}' for g in settings.guesses)} x m each way, union bound over them",
        flush=True,
    )
    print(f"{'mode':<9} {'accounted':>9}  {'lower bound':>11}  {'v/r':<11}  ({confidence} confidence)")
    ok = True
    for mode in modes:
        result = audit_round(mode, settings)
        ok &= EXPECT_PASS[mode] == result.passed
        print(verdict(result), flush=True)
    print(
        f"the audit came out as it must in {'every mode' if len(modes) > 1 else 'this mode'}: the real "
        "machinery passes, broken machinery is caught"
        if ok
        else "the audit did NOT come out as it must: see the lines above"
    )
    return 0 if ok else 1
