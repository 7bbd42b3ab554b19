"""The privacy audit's lower bound against the accounted epsilon, at a shipped DP study's settings.

    python bench/bench_audit.py [--config configs/pneumoniamnist-dp.yaml] [--site-size 3500] [--canaries 1000]

Takes from the study config what one site's round of it does: the batch size and local epochs, the
noise a site of `--site-size` training images derives for the whole study's target epsilon (with its
released count), hence the sample rate, the steps and the epsilon that one round is accounted at.
Then audits such a round (client/audit.py: 1000 gradient canaries, the site's real DP machinery, one
run) in each mode, side by side: the real settings (`secret`), the noise switched off, and the noise
seeded from the round (which the coordinator replays). Prints per mode the accounted epsilon, the
lower bound (95% confidence) and whether the audit says the machinery keeps its promise.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client.audit import MODES, AuditSettings, audit_round  # noqa: E402
from common.config import load_study  # noqa: E402
from common.privacy import PrivacyRequest, rdp_epsilon, request_config  # noqa: E402
from common.schema import SitePolicyConfig  # noqa: E402


def round_settings(config: str, site_size: int, canaries: int) -> tuple[AuditSettings, str]:
    study = (
        load_study(Path(__file__).resolve().parents[1] / config)
        if not Path(config).is_file()
        else load_study(config)
    )
    batches = math.ceil(site_size / study.train.batch_size)
    q, steps = 1.0 / batches, study.train.local_epochs * batches
    count_noise = SitePolicyConfig().count_noise
    request = PrivacyRequest.from_config(
        request_config(study.privacy),
        sample_rate=q,
        steps_total=study.rounds * steps,
        fixed=((count_noise, 1.0, 1),),
    )
    one_round = rdp_epsilon([(request.noise_multiplier, q, steps)], delta=study.privacy.delta)
    settings = AuditSettings(
        epsilon=one_round, delta=study.privacy.delta, canaries=canaries, steps=steps, sample_rate=q,
        max_grad_norm=study.privacy.max_grad_norm, train_size=site_size, model=study.model.name,
    )  # fmt: skip
    what = (
        f"{study.name}: a site of {site_size} images, batch {study.train.batch_size}, {study.train.local_epochs} "
        f"local epoch(s): {steps} steps at sample rate {q:.4f}, noise {request.noise_multiplier:.3f} "
        f"(derived for epsilon {study.privacy.target_epsilon} over {study.rounds} rounds); one round is "
        f"accounted at epsilon {one_round:.3f}"
    )
    return settings, what


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/pneumoniamnist-dp.yaml")
    parser.add_argument("--site-size", type=int, default=3500, help="training images at the audited site")
    parser.add_argument("--canaries", type=int, default=1000)
    args = parser.parse_args()
    settings, what = round_settings(args.config, args.site_size, args.canaries)
    print(f"\n== {what}")
    print("  mode        accounted eps   lower bound (95%)   guesses right   verdict")
    for mode in MODES:
        r = audit_round(mode, settings)
        verdict = "keeps its promise" if r.passed else "LEAKS MORE THAN IT COUNTS"
        print(
            f"  {mode:<10}  {r.epsilon:13.3f}   {r.lower_bound:17.3f}   {r.v:>5}/{r.r:<7}   {verdict}  ({r.seconds:.0f} s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
