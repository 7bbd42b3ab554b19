"""Two trainings at one site at once (two studies sharing its ledger) cannot both spend the budget
that is left: the site's own training path (`SiteRuntime.train`) holds the ledger lock from its budget
check to its ledger line.

The site trains in a child process while the test holds the ledger's lock. The child must block on
the lock (seen in /proc/locks, no sleeping), and once the test has spent the budget and let go, it
must see that spending and refuse. A child whose training path skips the lock (patched to) checks
its budget at once, trains, waits only to write its line, and overspends: the check can fail.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import time
from pathlib import Path

from client.ledger import LEDGER_FILENAME, SiteAccountant
from common.privacy import rdp_epsilon, request_config
from common.schema import PrivacyConfig, SiteConfig, SiteDataConfig, SitePolicyConfig, SyntheticConfig
from tests.plans import round_config

N_TRAIN, BATCH, NOISE, DELTA = 64, 32, 2.0, 1e-5
ROUND = (NOISE, BATCH / N_TRAIN, N_TRAIN // BATCH)  # one local epoch: 2 steps at sample rate 0.5
COUNT = (10.0, 1.0, 1)  # study-2's released training-set size (the policy's count_noise 10)


def _site(state_dir: Path, max_epsilon: float) -> SiteConfig:
    data = SiteDataConfig(
        format="synthetic", synthetic=SyntheticConfig(train_per_site=N_TRAIN, test_per_site=8)
    )
    return SiteConfig(
        site="hospital-a",
        data=data,
        privacy=SitePolicyConfig(max_epsilon=max_epsilon, delta=DELTA),
        state_dir=str(state_dir),
    )


def _train(site: SiteConfig, skip_lock: bool, out) -> None:
    """The child: one private round through the site's real training path."""
    from client import guard
    from client.site import SiteRuntime
    from common.models import build_model

    if skip_lock:  # a training path without the lock: what this test must catch
        guard.site_lock = lambda _site: contextlib.nullcontext()
    runtime = SiteRuntime.load(site)
    config = round_config(batch_size=BATCH, dp_enabled=True, study_id="study-2") | request_config(
        PrivacyConfig(enabled=True, noise_multiplier=NOISE, delta=DELTA)
    )
    reply = runtime.train(config, build_model("cnn28").state_dict())
    out.put("refused" if reply.refused else "trained")


def _waiting_on(lock_file: Path, pid: int) -> bool:
    """Whether process `pid` is blocked waiting for the flock on `lock_file` (Linux /proc/locks)."""
    inode = os.stat(lock_file).st_ino
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields and str(pid) in fields and any(f.endswith(f":{inode}") for f in fields):
            return True
    return False


def _race(state_dir: Path, budget: float, *, skip_lock: bool) -> tuple[str, bool]:
    """Hold the ledger lock, start the child, spend the budget while it waits, let go.
    Returns the child's outcome and whether it was seen waiting for the lock."""
    accountant = SiteAccountant(state_dir)
    # the child trains a later round of study-2, whose count is out already: a first round would write
    # its count line (which takes the lock) before its budget check, and so wait there even unlocked
    accountant.record_round(round=0, kind="count", value=N_TRAIN, steps=COUNT[2], sample_rate=COUNT[1],
                            noise_multiplier=COUNT[0], max_grad_norm=1.0, delta=DELTA, study="study-2")  # fmt: skip
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=_train, args=(_site(state_dir, budget), skip_lock, out))
    with accountant.ledger.locked():
        child.start()
        lock_file = state_dir / f"{LEDGER_FILENAME}.lock"
        waited, deadline = False, time.monotonic() + 180
        while child.is_alive() and time.monotonic() < deadline:
            if _waiting_on(lock_file, child.pid):
                waited = True
                break
            child.join(0.05)
        # another study's round spends the budget while the child waits (re-entrant in this process)
        accountant.record_round(round=1, steps=ROUND[2], sample_rate=ROUND[1], noise_multiplier=NOISE,
                                max_grad_norm=1.0, delta=DELTA, study="study-1")  # fmt: skip
    child.join(180)
    assert child.exitcode == 0
    return out.get(timeout=5), waited


def test_a_second_training_waits_for_the_ledger_and_sees_the_first_ones_spending(tmp_path):
    one, two = rdp_epsilon([COUNT, ROUND], delta=DELTA), rdp_epsilon([COUNT, ROUND, ROUND], delta=DELTA)
    budget = (one + two) / 2  # room for one round, not two

    outcome, waited = _race(tmp_path / "site", budget, skip_lock=False)

    assert waited, "the site's training did not wait for the ledger lock"
    assert outcome == "refused"
    assert SiteAccountant(tmp_path / "site").epsilon(DELTA) <= budget


def test_a_training_path_without_the_lock_overspends_and_is_caught(tmp_path):
    one, two = rdp_epsilon([COUNT, ROUND], delta=DELTA), rdp_epsilon([COUNT, ROUND, ROUND], delta=DELTA)
    budget = (one + two) / 2

    outcome, waited = _race(tmp_path / "site", budget, skip_lock=True)

    assert waited  # for its ledger line only, after its budget check: too late
    assert outcome == "trained"
    assert SiteAccountant(tmp_path / "site").epsilon(DELTA) > budget


def test_the_lock_is_reentrant_in_one_process(tmp_path):
    ledger = SiteAccountant(tmp_path).ledger
    with ledger.locked(), ledger.locked():
        SiteAccountant(tmp_path).record_round(
            round=1, steps=2, sample_rate=0.1, noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5
        )
    assert len(ledger.entries()) == 1
