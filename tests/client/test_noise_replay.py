"""The noise attack a curious coordinator would try: replay a site's DP round and subtract the noise.

A coordinator knows everything it sends (weights, round config, seeds) and the site's code. It replays
the round in a fresh process with identical inputs on data of its own, whose clipped gradient it can
compute, and so predicts the site's noise; subtracting the prediction from the site's update gives the
site's clipped gradient sum, if the noise is predictable. Each round here is one full-batch DP-SGD
step (SGD, lr 1), so the update is exactly -(clipped sum + noise) / batch size.

With the site's real randomness (the OS's entropy) the replay predicts nothing: the recovered gradient
is no closer to the truth than the noised update itself. With `privacy.repeatable_noise: true` (noise
seeded from the round, as before) the same attack recovers the gradient exactly: the test can fail.
"""

from __future__ import annotations

import multiprocessing as mp

import torch

from common.models import build_model
from common.privacy import request_config
from common.schema import (
    PrivacyConfig,
    SiteConfig,
    SiteDataConfig,
    SitePartition,
    SitePolicyConfig,
    SyntheticConfig,
)
from tests.plans import round_config

N, CLIP, NOISE, MODEL = 16, 1.0, 1.0, "cnn28-small"


def _site(index: int, state_dir: str, repeatable: bool) -> SiteConfig:
    data = SiteDataConfig(
        format="synthetic",
        partition=SitePartition(index=index, num_sites=2, seed=index),
        synthetic=SyntheticConfig(train_per_site=N, test_per_site=4),
    )
    # a count noise this small releases the exact size: every round is one full batch (sample rate 1)
    policy = SitePolicyConfig(max_epsilon=1e6, count_noise=1e-3, repeatable_noise=repeatable)
    return SiteConfig(site=f"site-{index}", data=data, privacy=policy, state_dir=state_dir)


def _config() -> dict:
    plan = round_config(
        dp_enabled=True, model=MODEL, batch_size=N, optimizer="sgd", lr=1.0, seed=3, study_id="s"
    )
    return plan | request_config(PrivacyConfig(enabled=True, noise_multiplier=NOISE, max_grad_norm=CLIP))


def _round_in_fresh_process(site: SiteConfig, out) -> None:
    from client.site import SiteRuntime

    reply = SiteRuntime.load(site).train(_config(), build_model(MODEL, seed=11).state_dict())
    out.put({k: v.detach().numpy().copy() for k, v in reply.weights.items()})  # by value, not shared memory


def _updates(*sites: SiteConfig) -> list[torch.Tensor]:
    """Each site's update w1 - w0, from a round trained in a fresh process of its own (run side by side)."""
    ctx = mp.get_context("spawn")
    queues = [ctx.Queue() for _ in sites]
    procs = [
        ctx.Process(target=_round_in_fresh_process, args=(s, q)) for s, q in zip(sites, queues, strict=True)
    ]
    for proc in procs:
        proc.start()
    results = [q.get(timeout=300) for q in queues]
    for proc in procs:
        proc.join(60)
    before = build_model(MODEL, seed=11).state_dict()
    return [
        torch.cat([(torch.from_numpy(r[k]) - before[k]).flatten().double() for k in before]) for r in results
    ]


def _clipped_sum(site: SiteConfig) -> torch.Tensor:
    """The sum of per-sample gradients clipped to CLIP, one backward pass per sample."""
    from common.data import load_site_data

    data = load_site_data(site)
    model = build_model(MODEL, seed=11)
    total = None
    for x, y in zip(data.train_x, data.train_y, strict=True):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[None]), y[None]).backward()
        g = torch.cat([p.grad.flatten().double() for p in model.parameters()])
        g = g * min(1.0, CLIP / (float(g.norm()) + 1e-6))
        total = g if total is None else total + g
    return total


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def _attack(tmp_path, repeatable: bool) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """(cosine of the recovered gradient with the truth, cosine of the noised update alone, the
    site's update, a second run of the same round)."""
    hospital = _site(0, str(tmp_path / "hospital"), repeatable)
    own = _site(1, str(tmp_path / "coordinator"), repeatable)  # the coordinator's own data
    update, replay, again = _updates(hospital, own, _site(0, str(tmp_path / "hospital-again"), repeatable))
    truth, known = _clipped_sum(hospital), _clipped_sum(own)
    predicted_noise = -N * replay - known  # exact, if the noise is the same in both runs
    recovered = -N * update - predicted_noise
    return _cosine(recovered, truth), _cosine(-N * update, truth), update, again


def test_the_replay_attack_recovers_nothing_from_the_sites_secret_noise(tmp_path):
    recovered, noised_alone, update, again = _attack(tmp_path, repeatable=False)
    print(f"secret noise: recovered cosine {recovered:.3f}, noised update alone {noised_alone:.3f}")

    assert not torch.equal(update, again)  # the same round, the same inputs: fresh noise
    assert abs(recovered) < 0.3, f"the attack recovered the gradient (cosine {recovered:.3f})"
    assert recovered < noised_alone + 0.1  # no better than reading the noised update itself


def test_the_same_attack_recovers_the_gradient_when_the_noise_is_seeded(tmp_path):
    recovered, noised_alone, update, again = _attack(tmp_path, repeatable=True)
    print(f"seeded noise: recovered cosine {recovered:.4f}, noised update alone {noised_alone:.3f}")

    assert torch.equal(update, again)  # seeded from the round: the same update every time
    assert recovered > 0.999, f"cosine {recovered:.4f}: the attack should work on seeded noise"
    # noise multiplier 1 on one sum: the noise hides the gradient from anyone who cannot predict it
    assert noised_alone < 0.5, f"the noised update alone has cosine {noised_alone:.3f} with the gradient"
