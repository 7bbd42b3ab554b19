"""Two processes training at one site at once (two studies sharing its ledger) cannot both spend the
budget that is left: the site's ledger lock makes the second wait for, and then see, the first's line."""

from __future__ import annotations

import multiprocessing as mp
import time

from client import guard
from client.ledger import SiteAccountant
from common.keys import Cfg
from common.privacy import PrivacyKey, rdp_epsilon
from common.schema import SiteConfig, SitePolicyConfig

N_TRAIN, BATCH, NOISE = 1000, 50, 1.0


def _site(state_dir: str, max_epsilon: float) -> SiteConfig:
    return SiteConfig(
        site="hospital-a", state_dir=state_dir, privacy=SitePolicyConfig(max_epsilon=max_epsilon)
    )


def _round_config(study: str) -> dict:
    return {
        Cfg.SERVER_ROUND: 1,
        Cfg.LOCAL_EPOCHS: 1,
        Cfg.BATCH_SIZE: BATCH,
        Cfg.PLANNED_ROUNDS: 1,
        Cfg.STUDY_ID: study,
        PrivacyKey.NOISE_MULTIPLIER: NOISE,
        PrivacyKey.MAX_GRAD_NORM: 1.0,
        PrivacyKey.DELTA: 1e-5,
    }


def _one_round(state_dir: str, max_epsilon: float, study: str, go, lock: bool, out) -> None:
    """Plan (budget check), 'train' for a while, record: as client.app.handle_train does."""
    site = _site(state_dir, max_epsilon)
    go.wait()
    with guard.site_lock(site) if lock else _nothing():
        plan, refusal = guard.plan_round(_round_config(study), site, N_TRAIN)
        if refusal:
            out.put((study, "refused"))
            return
        time.sleep(1.0)  # training
        plan.accountant.record_round(
            round=plan.round,
            steps=plan.steps,
            sample_rate=plan.sample_rate,
            noise_multiplier=NOISE,
            max_grad_norm=1.0,
            delta=plan.policy.delta,
            study=study,
        )
        out.put((study, "trained"))


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _race(state_dir: str, max_epsilon: float, lock: bool) -> list[str]:
    ctx = mp.get_context("spawn")
    go, out = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_one_round, args=(state_dir, max_epsilon, s, go, lock, out)) for s in ("s1", "s2")
    ]
    for p in procs:
        p.start()
    time.sleep(2.0)  # both processes imported and waiting
    go.set()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return sorted(out.get(timeout=5)[1] for _ in procs)


def _epsilon(rounds: int) -> float:
    return rdp_epsilon([(NOISE, BATCH / N_TRAIN, N_TRAIN // BATCH)] * rounds, delta=1e-5)


def test_concurrent_studies_cannot_overspend_a_site_budget(tmp_path):
    budget = (_epsilon(1) + _epsilon(2)) / 2  # room for one round, not two
    outcomes = _race(str(tmp_path / "locked"), budget, lock=True)
    assert outcomes == ["refused", "trained"]
    spent = SiteAccountant(tmp_path / "locked").epsilon(1e-5)
    assert spent <= budget

    # the same race without the lock overspends: what the lock is there for
    outcomes = _race(str(tmp_path / "unlocked"), budget, lock=False)
    assert outcomes == ["trained", "trained"]
    assert SiteAccountant(tmp_path / "unlocked").epsilon(1e-5) > budget


def test_the_lock_is_reentrant_in_one_process(tmp_path):
    ledger = SiteAccountant(tmp_path).ledger
    with ledger.locked(), ledger.locked():
        SiteAccountant(tmp_path).record_round(
            round=1, steps=2, sample_rate=0.1, noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5
        )
    assert len(ledger.entries()) == 1
