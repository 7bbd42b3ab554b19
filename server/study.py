"""`fedward study`: what federating gives each site, against training alone and pooling all data.

    fedward study configs/study-demo.yaml --out runs/study-demo

On the same sites and the same splits, in one go (the `study` section of the config says which):

  federated      the study as configured (Flower's simulation engine); with `study.compare_privacy`
                 also the other way (without privacy when the config has it on, with it when off)
  local          each site trains alone, in this process, with the ClientApp's own functions: the
                 same initial weights, rounds x local_epochs epochs, the lr schedule of the rounds,
                 and under privacy the same (target_epsilon, delta) budget
  centralized    all sites' training data pooled on one machine (simulation only: the upper reference)
  leave-one-out  for each site k: federate on all the other sites (k is not a node of that
                 federation), then test the final model on k's test data

Every trained model is then tested on every site's test data (the cross-site matrix), with 95%
bootstrap intervals and calibration (`common.uncertainty`). DIR gets study.json (every number),
report.html and the plots (`server.report`), one folder per federated run (results.json,
final_model.pt, fedward.log, each site's privacy ledger), the other models in DIR/models, and
progress.json while it runs. Each run gets its own fresh site state folders inside DIR: the runs of a
study are separate, hypothetical studies, so a site config's own state_dir (a real ledger) is not used.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import nn

from client.dp import make_private_for
from client.train import device, make_criterion, make_optimizer, predict, train_epochs, train_loader
from common.config import ConfigError, SiteConfig, StudyConfig, load_study, simulated_sites
from common.data import SiteData, load_site_data
from common.metrics import public_metrics, site_summary
from common.models import build_model, load_model, save_model
from common.privacy import PrivacyRequest, derive_noise_multiplier, rdp_epsilon
from common.uncertainty import bootstrap_intervals, calibration, paired_difference, roc_points
from server.coordinator import Reporter
from server.simulate import backend_config, preflight, simulate

STUDY_FILE = "study.json"
PROGRESS_FILE = "progress.json"
PLAIN, PRIVATE = "federated", "federated-dp"
SIM_OVERHEAD_GUESS_S = 20.0  # starting the site processes and the first evaluation, until measured


def validate_comparison(study: StudyConfig) -> None:
    """The `study` section's values; raises ConfigError naming the key."""
    p, c = study.source_path or "study config", study.study
    if c.bootstrap_samples < 100:
        raise ConfigError(
            f"{p}: 'study.bootstrap_samples' is {c.bootstrap_samples}; a 95% interval needs at least "
            f"100 resamples (1000 is the default)."
        )
    if c.calibration_bins < 2:
        raise ConfigError(
            f"{p}: 'study.calibration_bins' is {c.calibration_bins}; use 2 or more (10 is usual)."
        )
    if c.compare_privacy and study.strategy.name == "fedprox":
        raise ConfigError(
            f"{p}: 'study.compare_privacy' needs a strategy that works with privacy; 'strategy.name' "
            f"fedprox does not (use fedavg or fedadam)."
        )


def variants(study: StudyConfig) -> list[str]:
    """The federated runs: the study as configured first, then the other way when comparing privacy."""
    first = PRIVATE if study.privacy.enabled else PLAIN
    other = PLAIN if first == PRIVATE else PRIVATE
    return [first, other] if study.study.compare_privacy else [first]


def with_privacy(study: StudyConfig, private: bool) -> StudyConfig:
    """The study with privacy on or off; a class-balanced loss is not private, so the private runs
    train with the plain loss (study.json's settings say so)."""
    out = copy.deepcopy(study)
    out.privacy.enabled = private
    if private:
        out.train.class_balance = False
    return out


# ----------------------------------------------------------------------------- the plan and its progress


@dataclass
class Part:
    """One part of a study: a federated run, local training at every site, centralized, one left out."""

    key: str  # federated | federated-dp | local | local-dp | centralized | leave-one-out:<site>
    label: str
    units: float  # training work: rounds x local epochs x training images
    simulation: bool
    private: bool
    rounds: int


class StudyProgress(Reporter):
    """Live progress: which part, round and site, and an estimate of the time left.

    The estimate counts the training work left (images x epochs) at the speed measured so far, kept
    apart with and without privacy, plus the measured start-up cost of each federated run still to
    come. On a terminal a live bar shows it; every round and every site also prints one line, and
    DIR/progress.json holds the latest state for long runs watched from elsewhere.
    """

    def __init__(self, parts: list[Part], out_dir: Path, console: Console):
        self.parts, self.dir, self.console = parts, out_dir, console
        self.t0 = time.perf_counter()
        self.done_units = 0.0
        # measured [seconds, units] per kind of work: (federated run?, with privacy?)
        self.rate = {(sim, dp): [0.0, 0.0] for sim in (True, False) for dp in (True, False)}
        self.overheads: list[float] = []
        self.index, self.part, self.part_t0, self.part_round_s, self.part_done = -1, None, 0.0, 0.0, 0.0
        self.round, self.site = 0, None
        self.progress: Progress | None = None
        self.task = None

    # ------------------------------------------------------------------ estimate

    def _seconds_per_unit(self, simulation: bool, private: bool) -> float | None:
        """Measured speed of this kind of work, else of the nearest kind measured so far."""
        dp_factor = 3.0 if private else 1 / 3  # DP-SGD costs about 3x plain SGD per image (small CNNs)
        for sim, dp, factor in (
            (simulation, private, 1.0),
            (not simulation, private, 1.0),
            (simulation, not private, dp_factor),
            (not simulation, not private, dp_factor),
        ):
            secs, units = self.rate[(sim, dp)]
            if units > 0:
                return secs / units * factor
        return None

    def eta_s(self) -> float | None:
        left_units = dict.fromkeys(self.rate, 0.0)
        sims_left = 0
        for i, part in enumerate(self.parts):
            if i < self.index:
                continue
            done = self.part_done if i == self.index else 0.0
            left_units[(part.simulation, part.private)] += max(part.units - done, 0.0)
            if part.simulation and (i > self.index or (i == self.index and self.round == 0)):
                sims_left += 1
        total = 0.0
        for (simulation, private), units in left_units.items():
            if units == 0:
                continue
            rate = self._seconds_per_unit(simulation, private)
            if rate is None:
                return None
            total += units * rate
        overhead = float(np.median(self.overheads)) if self.overheads else SIM_OVERHEAD_GUESS_S
        return total + sims_left * overhead

    # ------------------------------------------------------------------ parts

    def begin(self, part: Part) -> None:
        self.index, self.part = self.parts.index(part), part
        self.part_t0, self.part_round_s, self.part_done = time.perf_counter(), 0.0, 0.0
        self.round, self.site = 0, None
        if self.console.is_terminal and self.progress is None:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.percentage:>3.0f}%"),
                TimeElapsedColumn(),
                TextColumn("{task.fields[left]}"),
                console=self.console,
                transient=True,
            )
            self.progress.start()
            self.task = self.progress.add_task("", total=sum(p.units for p in self.parts), left="")
        self._say(f"starting ({part.units:,.0f} image-epochs)")

    def end(self, part: Part) -> None:
        wall = time.perf_counter() - self.part_t0
        if part.simulation:
            self.overheads.append(max(wall - self.part_round_s, 0.0))
        self.done_units = sum(p.units for p in self.parts[: self.index + 1])
        self._update()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def at_site(self, site: str, status: str) -> None:
        """In-process work at one site begins (local training)."""
        self.site = site
        self._update(f"{site}: {status}")

    def trained(self, private: bool, units: float, seconds: float) -> None:
        """In-process training reports each finished round-equivalent (local, centralized)."""
        self.rate[(False, private)][0] += seconds
        self.rate[(False, private)][1] += units
        self.done_units += units
        self.part_done += units
        self._update()

    def site_done(self, site: str, text: str) -> None:
        self.site = site
        self._say(f"{site}: {text}")

    # ------------------------------------------------------------------ Reporter (federated runs)

    def start(self, study: StudyConfig, first_round: int) -> None:
        self._update(f"round 0/{self.part.rounds}: evaluating the initial model")

    def phase(self, round_: int, text: str) -> None:
        if round_ > 0:
            self._update(f"round {round_}/{self.part.rounds}: {text}")

    def round_done(self, record: dict, round_s: float) -> None:
        part = self.part
        self.round = record["round"]
        self.part_round_s += round_s
        units = part.units / max(part.rounds, 1)
        self.rate[(True, part.private)][0] += round_s
        self.rate[(True, part.private)][1] += units
        self.done_units += units
        self.part_done += units
        sites = "  ".join(
            f"{name} {_fmt(m.get('auc'))}" + (f" ε{m['epsilon']:.2f}" if m.get("epsilon") is not None else "")
            for name, m in record["sites"].items()
        )
        skipped = sorted({*record.get("refused", {}), *record.get("failed", {})})
        self._say(
            f"round {record['round']}/{part.rounds}  pooled AUC {_fmt(record['pooled'].get('auc'))}  | {sites}"
            + (f"  (did not train: {', '.join(skipped)})" if skipped else "")
        )

    def finish(self, results: dict) -> None: ...

    # ------------------------------------------------------------------ output

    def _left_text(self) -> str:
        eta = self.eta_s()
        return "estimating time left" if eta is None else f"about {_duration(eta)} left"

    def _update(self, status: str | None = None) -> None:
        if self.progress is not None and self.task is not None and self.part is not None:
            head = f"[{self.index + 1}/{len(self.parts)}] {self.part.label}"
            self.progress.update(
                self.task,
                completed=self.done_units,
                description=f"{head}: {status}" if status else head,
                left=self._left_text(),
            )
        self._write_state(status)

    def _say(self, text: str) -> None:
        elapsed = _duration(time.perf_counter() - self.t0)
        self.console.print(
            f"[{self.index + 1}/{len(self.parts)} {elapsed}, {self._left_text()}] {self.part.label} · {text}",
            highlight=False,
            soft_wrap=True,
        )
        self._update()

    def _write_state(self, status: str | None) -> None:
        eta = self.eta_s()
        total = sum(p.units for p in self.parts) or 1.0
        state = {
            "part": self.part.key if self.part else None,
            "label": self.part.label if self.part else None,
            "part_index": self.index + 1,
            "parts": len(self.parts),
            "round": self.round,
            "rounds": self.part.rounds if self.part else 0,
            "site": self.site,
            "status": status,
            "done_fraction": round(min(self.done_units / total, 1.0), 4),
            "elapsed_s": round(time.perf_counter() - self.t0, 1),
            "eta_s": None if eta is None else round(eta, 1),
            "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        _write_json(self.dir / PROGRESS_FILE, state)


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_clean(obj), indent=2, allow_nan=False))
    os.replace(tmp, path)


def _clean(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, np.generic):
        return _clean(obj.item())
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- Flower's engine, once


@contextlib.contextmanager
def one_ray_session(study: StudyConfig) -> Iterator[None]:
    """Run all of the study's federations in one Ray session.

    Flower starts Ray for every simulation and shuts it down at the end (8-10 s each on 2 cores); a
    study runs up to 2 + (number of sites) federations. So Ray is started once here, with the
    settings `server.simulate.backend_config` gives Flower; Flower's Ray backend then finds it up and
    skips `ray.init`, and its `ray.shutdown()` after each simulation is deferred to the study's end.
    Each simulation still starts and ends its own site processes (Ray actors).
    """
    import ray

    config = backend_config(study)
    threads = str(config["client_resources"]["num_cpus"])
    os.environ["FEDWARD_SITE_THREADS"] = threads
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if ray.is_initialized():  # someone else's session: leave it as it is
        yield
        return
    pythonpath = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ["PYTHONPATH"] = pythonpath
    ray.init(
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "FEDWARD_SITE_THREADS": threads}},
        **config["init_args"],
    )
    shutdown = ray.shutdown
    ray.shutdown = lambda *args, **kwargs: None
    try:
        yield
    finally:
        ray.shutdown = shutdown
        shutdown()


# ----------------------------------------------------------------------------- training outside Flower


def train_alone(
    study: StudyConfig,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    in_channels: int,
    num_classes: int,
    private: bool,
    report_delta: float,
    on_round=None,
) -> tuple[nn.Module, dict]:
    """Train one model on (x, y) as one site would train it through the whole federated study.

    Same initial weights as the federation's global model, `rounds` round-equivalents of
    `local_epochs` epochs, round r at lr * lr_decay**(r-1) with a fresh optimizer (as the ClientApp
    does every round). With `private`, each round is DP-SGD with the noise the ClientApp would
    derive for the whole study (or `privacy.noise_multiplier` when set), and epsilon is counted by a
    fresh RDP accountant over all rounds' steps, at `report_delta` (the site's policy delta).
    """
    t, p = study.train, study.privacy
    model = build_model(study.model.name, in_channels=in_channels, num_classes=num_classes, seed=study.seed)
    model = model.to(device())
    batches = math.ceil(len(y) / t.batch_size)
    noise = None
    if private:
        noise = p.noise_multiplier or derive_noise_multiplier(
            target_epsilon=p.target_epsilon,
            delta=p.delta,
            sample_rate=1.0 / batches,
            steps_total=study.rounds * t.local_epochs * batches,
        )
    balanced = t.class_balance and not private  # never with privacy (common.config)
    loss_fn = make_criterion(y, num_classes, balanced).to(device())
    request = None
    if private:
        request = PrivacyRequest(
            noise_multiplier=noise,
            max_grad_norm=p.max_grad_norm,
            delta=p.delta,
            grad_sample_mode=p.grad_sample_mode,
            poisson_sampling=p.poisson_sampling,
            secure_mode=p.secure_mode,
        )
    history, epsilons, losses = [], [], []
    t0 = time.perf_counter()
    for rnd in range(1, study.rounds + 1):
        seed = study.seed * 1000 + rnd
        loader = train_loader(x, y, t.batch_size, seed)
        optimizer = make_optimizer(model, t.optimizer, t.lr * t.lr_decay ** (rnd - 1))
        criterion, dp, trainee = loss_fn, None, model
        if private:
            dp = make_private_for(
                request, model=model, optimizer=optimizer, data_loader=loader, criterion=criterion
            )
            trainee, loader, optimizer, criterion = dp.model, dp.data_loader, dp.optimizer, dp.criterion
        r0 = time.perf_counter()
        try:
            result = train_epochs(
                trainee,
                loader,
                optimizer,
                criterion=criterion,
                epochs=t.local_epochs,
                use_augment=t.augment,
                seed=seed,
                private=dp is not None,
            )
        finally:
            if dp is not None:
                history += dp.history()
                model = dp.unwrap()
        losses.append(round(result.loss, 6))
        epsilons.append(rdp_epsilon(history, delta=report_delta) if private else None)
        if on_round is not None:
            on_round(rnd, time.perf_counter() - r0)
    info = {
        "n_train": int(len(y)),
        "epochs": study.rounds * t.local_epochs,
        "loss_by_round": losses,
        "private": private,
        "noise_multiplier": noise,
        "epsilon": epsilons[-1] if private else None,
        "delta": report_delta if private else None,
        "epsilon_by_round": epsilons if private else None,
        "train_s": round(time.perf_counter() - t0, 3),
    }
    return model.eval(), info


# ----------------------------------------------------------------------------- evaluation


class Evaluator:
    """Every model on every site's test data (and pooled), with intervals, calibration and ROC."""

    def __init__(self, data: dict[str, SiteData], study: StudyConfig):
        self.data, self.cfg, self.seed = data, study.study, study.seed
        self.labels = {s: d.test_y.numpy().astype(np.int64) for s, d in data.items()}
        self.labels["pooled"] = np.concatenate([self.labels[s] for s in data])
        self.probs: dict[str, dict[str, np.ndarray]] = {}  # model -> test set -> N x C probabilities

    def predict(self, key: str, model: nn.Module, sites: list[str] | None = None) -> None:
        sites = list(self.data) if sites is None else sites
        model = model.to(device())
        self.probs[key] = {s: predict(model, self.data[s].test_x) for s in sites}
        if sites == list(self.data):
            self.probs[key]["pooled"] = np.concatenate([self.probs[key][s] for s in self.data])

    def block(self, labels: np.ndarray, probs: np.ndarray, *, roc: bool) -> dict:
        out = public_metrics(site_summary(labels, probs))
        out["ci"] = bootstrap_intervals(labels, probs, samples=self.cfg.bootstrap_samples, seed=self.seed)
        cal = calibration(labels, probs, bins=self.cfg.calibration_bins)
        out["ece"], out["calibration"] = cal["ece"], cal["bins"]
        if roc:
            out["roc"] = roc_points(labels, probs)
        return out

    def evaluate(self, key: str, *, roc_on: set[str] | None = None) -> dict:
        """{test set: metrics} for a predicted model; ROC points for the test sets in `roc_on`."""
        roc_on = set(self.probs[key]) if roc_on is None else roc_on
        return {s: self.block(self.labels[s], p, roc=s in roc_on) for s, p in self.probs[key].items()}

    def pooled_own(self, keys: dict[str, str]) -> np.ndarray:
        """Pooled predictions where each site's test data is scored by its own model (site -> key)."""
        return np.concatenate([self.probs[keys[s]][s] for s in self.data])

    def difference(self, test_set: str, probs_a: np.ndarray, probs_b: np.ndarray) -> dict:
        return paired_difference(
            self.labels[test_set], probs_a, probs_b, samples=self.cfg.bootstrap_samples, seed=self.seed
        )


# ----------------------------------------------------------------------------- the study


def _load_all(study: StudyConfig, out: Path) -> dict[str, SiteData]:
    """Every site's data, for the in-process parts; `simulate.preflight` checks it first, naming the
    site and file of anything unusable. Decoded-image caches (real sites) go to OUT/sites/<site>."""
    sites = preflight(study, out)
    return {site.site: load_site_data(site) for site in sites}


def _sites_for(study: StudyConfig, run_dir: Path, leave_out: str | None = None) -> list[SiteConfig]:
    """The study's sites (partition order) with fresh state folders in run_dir; `leave_out` is not one."""
    sites = simulated_sites(study)
    for site in sites:
        site.state_dir = str(run_dir / "sites" / site.site)
    return [s for s in sites if s.site != leave_out]


def plan(study: StudyConfig, data: dict[str, SiteData]) -> list[Part]:
    c, epochs = study.study, study.rounds * study.train.local_epochs
    n = {s: len(d.train_y) for s, d in data.items()}
    total = sum(n.values())
    parts = [
        Part(
            v,
            "federated" + (" with privacy" if v == PRIVATE else ""),
            epochs * total,
            True,
            v == PRIVATE,
            study.rounds,
        )
        for v in variants(study)
    ]
    if c.local:
        for v in variants(study):
            key = "local-dp" if v == PRIVATE else "local"
            label = "local-only" + (" with privacy" if v == PRIVATE else "")
            parts.append(Part(key, label, epochs * total, False, v == PRIVATE, study.rounds))
    if c.centralized:
        parts.append(
            Part("centralized", "centralized (pooled data)", epochs * total, False, False, study.rounds)
        )
    if c.leave_one_out and len(data) >= 2:
        for s in data:
            parts.append(
                Part(
                    f"leave-one-out:{s}",
                    f"leave out {s}",
                    epochs * (total - n[s]),
                    True,
                    study.privacy.enabled,
                    study.rounds,
                )
            )
    return parts


def _nodes(results: dict) -> list[str]:
    """Every site that was a node of a federated run: evaluated or trained in any round."""
    names = set(results.get("initial", {}).get("sites", {}))
    for r in results.get("rounds", []):
        names |= set(r.get("sites", {})) | set(r.get("participants", [])) | set(r.get("train", {}))
    return sorted(names)


def _participants(results: dict) -> list[str]:
    return sorted({p for r in results.get("rounds", []) for p in r.get("participants", [])})


class ComparisonRun:
    """One `fedward study` in DIR: runs the parts in order, writing study.json after each."""

    def __init__(self, study: StudyConfig, out: Path, console: Console, verbose: bool):
        self.study, self.out, self.verbose = study, out, verbose
        self.data = _load_all(study, out)
        first = next(iter(self.data.values()))
        self.shape = {"in_channels": first.in_channels, "num_classes": first.num_classes}
        self.policy_delta = {s.site: s.privacy.delta for s in simulated_sites(study)}
        self.parts = plan(study, self.data)
        self.progress = StudyProgress(self.parts, out, console)
        self.evaluator = Evaluator(self.data, study)
        self.t0 = time.perf_counter()
        self.doc = {
            "kind": "fedward-study",
            "version": 1,
            "study": study.to_dict(),
            "status": "running",
            "primary": variants(study)[0],
            "variants": variants(study),
            "sites": list(self.data),
            "site_info": {s: _site_info(d) for s, d in self.data.items()},
            "settings": {
                "bootstrap_samples": study.study.bootstrap_samples,
                "bootstrap": "stratified by class, percentile intervals, numpy default_rng(seed)",
                "confidence": 0.95,
                "calibration_bins": study.study.calibration_bins,
                "seed": study.seed,
                "epochs": study.rounds * study.train.local_epochs,
                "class_balance": {
                    "without privacy": study.train.class_balance,
                    "with privacy": False,  # never: the weights would be counted on private data
                },
            },
            "parts": [p.key for p in self.parts],
            "models": {},
            "timing": {"parts_s": {}},
        }

    @property
    def models(self) -> dict:
        return self.doc["models"]

    def save(self) -> None:
        self.doc["timing"]["total_s"] = round(time.perf_counter() - self.t0, 2)
        _write_json(self.out / STUDY_FILE, self.doc)

    def run(self) -> dict:
        from server.report import build_report, plain_summary

        threads = torch.get_num_threads()
        torch.set_num_threads(backend_config(self.study)["client_resources"]["num_cpus"])  # as a site has
        try:
            with one_ray_session(self.study):
                for part in self.parts:
                    self.progress.begin(part)
                    p0 = time.perf_counter()
                    if part.key in (PLAIN, PRIVATE):
                        self.federated(part)
                    elif part.key in ("local", "local-dp"):
                        for site in self.data:
                            self.local(part, site)
                    elif part.key == "centralized":
                        self.centralized(part)
                    else:
                        self.leave_one_out(part, part.key.split(":", 1)[1])
                    self.doc["timing"]["parts_s"][part.key] = round(time.perf_counter() - p0, 2)
                    self.progress.end(part)
                    self.save()
        finally:
            self.progress.close()
            torch.set_num_threads(threads)
        self.doc["comparison"] = compare(self.doc, self.evaluator)
        self.doc["cross_site"] = cross_site(self.doc)
        done = all(self.models[v].get("status") == "completed" for v in self.doc["variants"])
        self.doc["status"] = "completed" if done else "stopped"
        self.doc["summary"] = plain_summary(self.doc)
        self.save()
        build_report(self.out)
        return self.doc

    # ------------------------------------------------------------------ the parts

    def _federate(self, study: StudyConfig, run_dir: Path, leave_out: str | None) -> tuple[dict, nn.Module]:
        results = simulate(
            study,
            run_dir,
            reporter=self.progress,
            verbose=self.verbose,
            sites=_sites_for(study, run_dir, leave_out),
        )
        model, _ = load_model(run_dir / "final_model.pt")
        return results, model

    def federated(self, part: Part) -> None:
        results, model = self._federate(with_privacy(self.study, part.private), self.out / part.key, None)
        self.evaluator.predict(part.key, model)
        self.models[part.key] = {
            "kind": "federated",
            "private": part.private,
            "run_dir": part.key,
            "status": results.get("status"),
            "stop_reason": results.get("stop_reason"),
            "participants": _participants(results),
            "epsilon": _final_epsilon(results) if part.private else None,
            "eval": self.evaluator.evaluate(part.key),
            "results": results,
        }

    def _train(self, x: torch.Tensor, y: torch.Tensor, private: bool, delta: float) -> tuple[nn.Module, dict]:
        units = len(y) * self.study.train.local_epochs

        def tick(_round: int, seconds: float) -> None:
            self.progress.trained(private, units, seconds)

        return train_alone(self.study, x, y, **self.shape, private=private, report_delta=delta, on_round=tick)

    def local(self, part: Part, site: str) -> None:
        d, key = self.data[site], f"{part.key}:{site}"
        self.progress.at_site(site, f"training alone for {self.doc['settings']['epochs']} epochs")
        model, info = self._train(d.train_x, d.train_y, part.private, self.policy_delta[site])
        save_model(self.out / "models" / f"{part.key}-{site}.pt", model, meta=self._meta(key))
        self.evaluator.predict(key, model)
        self.models[key] = {
            "kind": "local",
            "site": site,
            **info,
            "eval": self.evaluator.evaluate(key, roc_on={site}),
        }
        eps = f", ε {info['epsilon']:.2f}" if part.private else ""
        own = self.models[key]["eval"][site]["auc"]
        self.progress.site_done(site, f"trained alone, AUC on its own test data {_fmt(own)}{eps}")

    def centralized(self, part: Part) -> None:
        x = torch.cat([d.train_x for d in self.data.values()])
        y = torch.cat([d.train_y for d in self.data.values()])
        model, info = self._train(x, y, False, self.study.privacy.delta)
        save_model(self.out / "models" / "centralized.pt", model, meta=self._meta(part.key))
        self.evaluator.predict(part.key, model)
        self.models[part.key] = {"kind": "centralized", **info, "eval": self.evaluator.evaluate(part.key)}

    def leave_one_out(self, part: Part, held_out: str) -> None:
        study = copy.deepcopy(self.study)
        study.min_sites = min(study.min_sites, len(self.data) - 1)
        run_dir = self.out / "leave-one-out" / held_out
        results, model = self._federate(study, run_dir, held_out)
        nodes = _nodes(results)
        if held_out in nodes:  # cannot happen: the engine was never given the site
            raise RuntimeError(f"{held_out} was a node of the federation without it ({run_dir})")
        self.evaluator.predict(part.key, model, sites=[held_out])
        self.models[part.key] = {
            "kind": "leave-one-out",
            "held_out": held_out,
            "private": part.private,
            "run_dir": f"leave-one-out/{held_out}",
            "status": results.get("status"),
            "nodes": nodes,
            "participants": _participants(results),
            "epsilon": _final_epsilon(results) if part.private else None,
            "eval": self.evaluator.evaluate(part.key),
            "results": results,
        }
        auc = self.models[part.key]["eval"][held_out]["auc"]
        self.progress.site_done(held_out, f"never took part; AUC on its test data {_fmt(auc)}")

    def _meta(self, key: str) -> dict:
        return {
            "model": self.study.model.name,
            **self.shape,
            "trained_as": key,
            "study": self.study.to_dict(),
        }


def _site_info(d: SiteData) -> dict:
    return {
        "n_train": int(len(d.train_y)),
        "n_test": int(len(d.test_y)),
        "train_positive_share": round(float((d.train_y == 1).float().mean()), 4),
        "test_positive_share": round(float((d.test_y == 1).float().mean()), 4),
    }


def run_comparison(
    study: StudyConfig,
    out_dir: str | Path,
    *,
    console: Console | None = None,
    verbose: bool = False,
) -> dict:
    """Run every part of the study (see the module docstring) into OUT_DIR; returns study.json's dict.

    Raises:
        ConfigError: a bad `study` section, unusable site data, or OUT_DIR already holds a study.
    """
    validate_comparison(study)
    out = Path(out_dir)
    if (out / STUDY_FILE).exists() or any((out / v).exists() for v in (PLAIN, PRIVATE, "leave-one-out")):
        raise ConfigError(
            f"'{out}' already holds a study (its privacy ledgers would add up with this one's); "
            f"choose a new --out folder or delete this one."
        )
    (out / "models").mkdir(parents=True, exist_ok=True)
    return ComparisonRun(study, out, console or Console(), verbose).run()


def _final_epsilon(results: dict) -> dict[str, float | None]:
    return {s: m.get("epsilon") for s, m in results.get("final", {}).get("sites", {}).items()}


def _slim(block: dict) -> dict:
    return {"auc": block.get("auc"), "ci": block.get("ci", {}).get("auc")}


def compare(doc: dict, ev: Evaluator) -> dict:
    """Per site and pooled: AUC (with interval) of each kind of model, and what federating gains.

    Pooled columns: federated and centralized models on all test data together; `local` and
    `local-dp` score each site's test data with that site's own model (what the hospitals would get
    each deploying their own); `leave-one-out` scores each site's data with the model federated
    without it. Gains are paired bootstrap differences on the same resamples.
    """
    models, sites = doc["models"], doc["sites"]
    columns = [
        c
        for c in ("local", "local-dp", PLAIN, PRIVATE, "centralized", "leave-one-out")
        if c in models or any(k.startswith(c + ":") for k in models)
    ]
    rows: dict[str, dict] = {}
    for s in sites:
        row = {}
        for c in columns:
            key = c if c in models else f"{c}:{s}"
            if key in models and s in models[key]["eval"]:
                row[c] = {"model": key, **_slim(models[key]["eval"][s])}
        rows[s] = row
    pooled = {}
    for c in columns:
        if c in models:
            pooled[c] = {"model": c, **_slim(models[c]["eval"]["pooled"])}
        elif all(f"{c}:{s}" in ev.probs for s in sites):
            probs = ev.pooled_own({s: f"{c}:{s}" for s in sites})
            block = ev.block(ev.labels["pooled"], probs, roc=False)
            pooled[c] = {"model": f"{c}:<each site>", **_slim(block)}
    rows["pooled"] = pooled
    gains: dict[str, dict] = {}
    pairs = [(PLAIN, "local"), (PRIVATE, "local-dp")]
    for s in [*sites, "pooled"]:
        gains[s] = {}
        for fed, local in pairs:
            if fed not in ev.probs or not all(f"{local}:{x}" in ev.probs for x in sites):
                continue
            own = (
                ev.pooled_own({x: f"{local}:{x}" for x in sites})
                if s == "pooled"
                else ev.probs[f"{local}:{s}"][s]
            )
            diff = ev.difference(s, ev.probs[fed][s], own)["auc"]
            gains[s][f"{fed}_vs_{local}"] = diff
        if "centralized" in ev.probs:
            for fed in (PLAIN, PRIVATE):
                if fed in ev.probs:
                    gains[s][f"{fed}_vs_centralized"] = ev.difference(
                        s, ev.probs[fed][s], ev.probs["centralized"][s]
                    )["auc"]
    return {"columns": columns, "rows": rows, "gains": gains}


def cross_site(doc: dict) -> dict:
    """Rows: every model trained on a site, each federated model, centralized; columns: test sets."""
    models, sites = doc["models"], doc["sites"]
    keys = [k for k in models if models[k]["kind"] == "local"]
    keys += [v for v in (PLAIN, PRIVATE) if v in models]
    keys += ["centralized"] if "centralized" in models else []
    columns = [*sites, "pooled"]
    return {
        "rows": keys,
        "columns": columns,
        "auc": [[models[k]["eval"].get(c, {}).get("auc") for c in columns] for k in keys],
        "ci": [[models[k]["eval"].get(c, {}).get("ci", {}).get("auc") for c in columns] for k in keys],
    }


# ----------------------------------------------------------------------------- command line


def summary_table(doc: dict) -> Table:
    comp = doc["comparison"]
    table = Table(title=f"fedward study '{doc['study']['name']}': test AUC per site ({doc['status']})")
    table.add_column("site", no_wrap=True)
    for c in comp["columns"]:
        table.add_column(c, justify="right", no_wrap=True)
    for s, row in comp["rows"].items():
        table.add_row(
            f"[bold]{s}[/]" if s == "pooled" else s,
            *(_fmt(row.get(c, {}).get("auc")) for c in comp["columns"]),
        )
    return table


def cli(args: argparse.Namespace, console: Console) -> int:
    """`fedward study CONFIG --out DIR [--rounds N] [--sites K] [--data-dir D] [-v]`."""
    study = load_study(args.config, rounds=args.rounds, num_sites=args.sites, data_dir=args.data_dir)
    validate_comparison(study)
    n_sites = study.data.num_sites if study.data.source != "sites" else len(study.data.site_configs)
    console.print(
        f"[bold]fedward study[/] '{study.name}': {n_sites} sites, {study.rounds} rounds x "
        f"{study.train.local_epochs} local epochs, model {study.model.name}; runs: "
        f"{', '.join(variants(study))}"
        + (", local-only" if study.study.local else "")
        + (", centralized" if study.study.centralized else "")
        + (", leave-one-out" if study.study.leave_one_out else "")
        + f" -> {args.out}",
        highlight=False,
    )
    doc = run_comparison(study, args.out, console=console, verbose=args.verbose)
    console.print(summary_table(doc))
    for line in doc["summary"]:
        console.print(f"- {line}", highlight=False)
    console.print(f"study: {args.out}/{STUDY_FILE}   report: {args.out}/report.html", highlight=False)
    return 0 if doc["status"] == "completed" else 3


def main(argv: list[str] | None = None) -> int:
    """`python -m server.study ...`: the same as `fedward study ...`."""
    from server.cli import main as fedward

    return fedward(["study", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
