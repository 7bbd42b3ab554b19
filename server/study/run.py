"""`fedward study`: what federating gives each site, against training alone and pooling all data.

    fedward study configs/study-demo.yaml --out runs/study-demo

On the same sites and the same splits, in one go (the `study` section of the config says which):

  federated      the study as configured (Flower's simulation engine); with `study.compare_privacy`
                 also the other way (without privacy when the config has it on, with it when off)
  local          each site trains alone, in this process, with the ClientApp's own recipe
                 (server.study.references): the same initial weights, rounds x local_epochs epochs,
                 the lr schedule of the rounds, the site's own augmentation, and under privacy the
                 same (target_epsilon, delta) budget
  centralized    all sites' training data pooled on one machine (simulation only: the upper reference)
  leave-one-out  for each site k: federate on all the other sites (k is not a node of that
                 federation), then test the final model on k's test data

Every trained model is then tested on every site's test data (the cross-site matrix), with 95%
bootstrap intervals and calibration (server.study.evaluate). DIR gets study.json (every number),
report.html and the plots (server.report), one folder per federated run (results.json,
final_model.pt, fedward.log, each site's privacy ledger), the other models in DIR/models, and
progress.json while it runs. Over simulated data (synthetic, MedMNIST partitions) each run gets its own
fresh site state folders inside DIR: the runs of such a study are separate, hypothetical studies. Over
hospitals' own site configs (`data.source: sites`) every run obeys each site's policy and spends its
real ledger, and study.json says what the whole study spent per site (server.study.site_ledgers).
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from common.data import load_site_data
from common.models import load_model, save_model
from common.privacy import epsilon_text
from common.schema import SiteConfig, StudyConfig
from common.simulated import simulated_sites
from common.sitedata import SiteData
from common.transforms import augment_fn
from server.interrupt import Interrupted, StopRequest
from server.ray_session import backend_config, one_ray_session
from server.report import build_report, plain_summary
from server.report.doc import METRIC_LABELS
from server.run_claim import claim_run_folder
from server.run_folder import (
    FEDERATED_VARIANTS,
    FINAL_MODEL_FILE,
    LEAVE_ONE_OUT_DIR,
    MODELS_DIR,
    SITES_DIR,
    STUDY_FILE,
    STUDY_KIND,
    STUDY_VERSION,
    Variant,
    final_epsilon,
    io_error,
    nodes,
    participants,
    split_key,
    write_json,
)
from server.simulate import preflight, simulate
from server.study import personal
from server.study.evaluate import compare, cross_site, evaluator_for
from server.study.plan import Part, check_study_folder, plan, validate_comparison, variants, with_privacy
from server.study.progress import StudyProgress, fmt
from server.study.references import train_alone
from server.study.site_ledgers import (
    check_policies,
    privacy_spent,
    real_sites,
    record_pooled_release,
    train_at_site,
)


class ComparisonRun:
    """One `fedward study` in DIR: runs the parts in order, writing study.json after each."""

    def __init__(
        self, study: StudyConfig, out: Path, console: Console, verbose: bool, stop: StopRequest | None = None
    ):
        self.study, self.out, self.verbose = study, out, verbose
        self.stop = stop or StopRequest()
        self.sites = {site.site: site for site in preflight(study, out)}
        self.data = {name: load_site_data(site) for name, site in self.sites.items()}
        first = next(iter(self.data.values()))
        self.shape = {"in_channels": first.in_channels, "num_classes": first.num_classes}
        self.policy_delta = {name: site.privacy.delta for name, site in self.sites.items()}
        self.parts = plan(study, self.data)
        if real_sites(study):  # hospitals' own sites: their policies decide which runs may train
            check_policies(study, self.sites, self.parts)
        self.study_ids: set[str] = set()  # every run's study id: what this study spent at each site
        self.progress = StudyProgress(self.parts, out, console)
        self.evaluator = evaluator_for(self.data, study)
        self.trained: dict[str, nn.Module] = {}  # every model by key: the candidates of each site's choice
        self.t0 = time.perf_counter()
        self.doc = {
            "kind": STUDY_KIND,
            "version": STUDY_VERSION,
            "study": study.to_dict(),
            "status": "running",
            "primary": variants(study)[0],
            "metric": self.evaluator.metric,  # the headline of the comparison: auc, or dice for segmentation
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
        write_json(self.out / STUDY_FILE, self.doc)

    def run(self) -> dict:
        threads = torch.get_num_threads()
        torch.set_num_threads(backend_config(self.study)["client_resources"]["num_cpus"])  # as a site has
        try:
            with one_ray_session(self.study):
                for part in self.parts:
                    self.progress.begin(part)
                    p0 = time.perf_counter()
                    self.run_part(part)
                    self.doc["timing"]["parts_s"][part.key] = round(time.perf_counter() - p0, 2)
                    self.progress.end(part)
                    self.save()
        except Interrupted as why:
            return self._interrupted(str(why), part.key)
        finally:
            self.progress.close()
            torch.set_num_threads(threads)
        self.doc["comparison"] = compare(self.doc, self.evaluator)
        self.doc["cross_site"] = cross_site(self.doc, self.evaluator.metric)
        self.doc["best_for_site"] = personal.best_for_site(self)
        self.doc["chosen_pooled"] = personal.chosen_pooled(self, self.doc["best_for_site"])
        done = all(self.models[v].get("status") == "completed" for v in self.doc["variants"])
        self.doc["status"] = "completed" if done else "stopped"
        self.doc["summary"] = plain_summary(self.doc)
        self.doc["privacy_spent"] = (
            privacy_spent(self.sites, self.study_ids) if real_sites(self.study) else None
        )
        self.save()
        build_report(self.out)
        return self.doc

    def _interrupted(self, signal_name: str, part: str) -> dict:
        """study.json says where the study stopped; the runs it finished stay in the folder."""
        self.doc["status"] = "interrupted"
        self.doc["interrupted"] = {
            "signal": signal_name,
            "part": part,
            "parts_done": list(self.doc["timing"]["parts_s"]),
            "resume": f"a study starts afresh: fedward study {self.study.source_path} --out {self.out} --force "
            "(moves this folder aside)",
        }
        self.doc["summary"] = [f"interrupted by {signal_name} during '{part}'"]
        self.save()
        return self.doc

    # ------------------------------------------------------------------ the parts

    def run_part(self, part: Part) -> None:
        variant, site = split_key(part.key)
        if variant in FEDERATED_VARIANTS:
            self.federated(part)
        elif variant in (Variant.LOCAL, Variant.LOCAL_DP):
            for name in self.data:
                self.local(part, name)
        elif variant == Variant.CENTRALIZED:
            self.centralized(part)
        elif variant == Variant.FEDBN:
            personal.fedbn_models(self, part)
        elif variant == Variant.FINE_TUNED:
            for name in self.data:
                personal.fine_tune(self, part, name)
        else:
            self.leave_one_out(part, site)

    def _federate(self, study: StudyConfig, run_dir: Path, leave_out: str | None) -> tuple[dict, nn.Module]:
        results = simulate(
            study,
            run_dir,
            reporter=self.progress,
            verbose=self.verbose,
            sites=self.site_configs(study, run_dir, leave_out),
            stop=self.stop,
            command=f"fedward study {self.study.source_path} --out {self.out}",
        )
        self.study_ids.add(results["study_id"])
        self.stop.check()  # an interrupted federation ends the study
        model, _ = load_model(run_dir / FINAL_MODEL_FILE)
        return results, model

    def site_configs(
        self, study: StudyConfig, run_dir: Path, leave_out: str | None = None
    ) -> list[SiteConfig]:
        """The sites of a federated run in `run_dir` (server.study.run._sites_for)."""
        return _sites_for(study, run_dir, leave_out)

    def federated(self, part: Part) -> None:
        results, model = self._federate(with_privacy(self.study, part.private), self.out / part.key, None)
        self.trained[part.key] = model
        self.evaluator.predict(part.key, model)
        self.models[part.key] = {
            "kind": str(Variant.FEDERATED),
            "private": part.private,
            "run_dir": part.key,
            "status": results.get("status"),
            "stop_reason": results.get("stop_reason"),
            "participants": participants(results),
            "epsilon": final_epsilon(results) if part.private else None,
            "eval": self.evaluator.evaluate(part.key),
            "results": results,
        }

    def _train(
        self, x: torch.Tensor, y: torch.Tensor, private: bool, delta: float, augment
    ) -> tuple[nn.Module, dict]:
        units = len(y) * self.study.train.local_epochs

        def tick(_round: int, seconds: float) -> None:
            self.progress.trained(private, units, seconds)
            self.stop.check()

        return train_alone(
            self.study,
            x,
            y,
            **self.shape,
            private=private,
            report_delta=delta,
            augment_fn=augment,
            on_round=tick,
        )

    def local(self, part: Part, site: str) -> None:
        d, key = self.data[site], f"{part.key}:{site}"
        self.progress.at_site(site, f"training alone for {self.doc['settings']['epochs']} epochs")
        if real_sites(self.study):  # through the site's own path: its policy, its real ledger
            units = len(d.train_y) * self.study.train.local_epochs

            def tick(_round: int, seconds: float) -> None:
                self.progress.trained(part.private, units, seconds)
                self.stop.check()

            model, info = train_at_site(self.study, self.sites[site], d, private=part.private, on_round=tick)
            self.study_ids.add(info["study_id"])
        else:
            augment = augment_fn(self.sites[site].data)
            model, info = self._train(d.train_x, d.train_y, part.private, self.policy_delta[site], augment)
        save_model(self.out / MODELS_DIR / f"{part.key}-{site}.pt", model, meta=self._meta(key))
        self.trained[key] = model
        self.evaluator.predict(key, model)
        self.models[key] = {
            "kind": str(Variant.LOCAL),
            "site": site,
            **info,
            "eval": self.evaluator.evaluate(key, roc_on={site}),
        }
        eps = f", ε {epsilon_text(info['epsilon'])}" if part.private and info["epsilon"] is not None else ""
        own = self.models[key]["eval"][site][self.evaluator.metric]
        label = METRIC_LABELS[self.evaluator.metric]
        self.progress.site_done(site, f"trained alone, {label} on its own test data {fmt(own)}{eps}")

    def centralized(self, part: Part) -> None:
        x = torch.cat([d.train_x for d in self.data.values()])
        y = torch.cat([d.train_y for d in self.data.values()])
        model, info = self._train(x, y, False, self.study.privacy.delta, self._pooled_augment())
        if real_sites(self.study):  # hospitals' images trained without DP: in their ledgers, as unbounded
            steps = info["epochs"] * math.ceil(len(y) / self.study.train.batch_size)
            self.study_ids.add(record_pooled_release(self.study, self.sites, steps))
        save_model(self.out / MODELS_DIR / f"{Variant.CENTRALIZED}.pt", model, meta=self._meta(part.key))
        self.evaluator.predict(part.key, model)
        self.models[part.key] = {
            "kind": str(Variant.CENTRALIZED),
            **info,
            "eval": self.evaluator.evaluate(part.key),
        }

    def _pooled_augment(self):
        """The sites' augmentation for pooled training when they all use the same; else none, and
        study.json's settings say so."""
        configs = {repr(site.data.augment) for site in self.sites.values()}
        if len(configs) == 1:
            return augment_fn(next(iter(self.sites.values())).data)
        self.doc["settings"]["centralized_augmentation"] = "none: the sites' augmentations differ"
        return None

    def leave_one_out(self, part: Part, held_out: str) -> None:
        study = copy.deepcopy(self.study)
        study.min_sites = min(study.min_sites, len(self.data) - 1)
        run_dir = self.out / LEAVE_ONE_OUT_DIR / held_out
        results, model = self._federate(study, run_dir, held_out)
        node_names = nodes(results)
        if held_out in node_names:  # cannot happen: the engine was never given the site
            raise RuntimeError(f"{held_out} was a node of the federation without it ({run_dir})")
        self.evaluator.predict(part.key, model, sites=[held_out])
        self.models[part.key] = {
            "kind": str(Variant.LEAVE_ONE_OUT),
            "held_out": held_out,
            "private": part.private,
            "run_dir": f"{LEAVE_ONE_OUT_DIR}/{held_out}",
            "status": results.get("status"),
            "nodes": node_names,
            "participants": participants(results),
            "epsilon": final_epsilon(results) if part.private else None,
            "eval": self.evaluator.evaluate(part.key),
            "results": results,
        }
        score = self.models[part.key]["eval"][held_out][self.evaluator.metric]
        label = METRIC_LABELS[self.evaluator.metric]
        self.progress.site_done(held_out, f"never took part; {label} on its test data {fmt(score)}")

    def _meta(self, key: str) -> dict:
        return {
            "model": self.study.model.name,
            **self.shape,
            "trained_as": key,
            "study": self.study.to_dict(),
        }


def _site_info(d: SiteData) -> dict:
    """Sizes and the share of class 1 (for segmentation: of the label maps' pixels)."""
    return {
        "n_train": int(len(d.train_y)),
        "n_test": int(len(d.test_y)),
        "train_positive_share": round(float((d.train_y == 1).float().mean()), 4),
        "test_positive_share": round(float((d.test_y == 1).float().mean()), 4),
    }


def _sites_for(study: StudyConfig, run_dir: Path, leave_out: str | None = None) -> list[SiteConfig]:
    """The study's sites (partition order) with fresh state folders in run_dir (a hospital's own site
    keeps its own: server.study.site_ledgers); `leave_out` is not one."""
    sites = simulated_sites(study)
    for site in sites:
        if not real_sites(study):  # a hospital's own site keeps its state_dir: its real ledger
            site.state_dir = str(run_dir / SITES_DIR / site.site)
    return [s for s in sites if s.site != leave_out]


def run_comparison(
    study: StudyConfig,
    out_dir: str | Path,
    *,
    console: Console | None = None,
    verbose: bool = False,
    force: bool = False,
    stop: StopRequest | None = None,
) -> dict:
    """Run every part of the study (see the module docstring) into OUT_DIR; returns study.json's dict.

    OUT_DIR is claimed (server.run_claim): a folder holding any run is refused, unless `force` moves
    it aside. `stop` (server.interrupt) ends the study with `status: interrupted`.

    Raises:
        ConfigError: a bad `study` section, unusable site data, or OUT_DIR in use or holding a run.
    """
    validate_comparison(study)
    out = Path(out_dir)
    check_study_folder(out, force=force)
    with claim_run_folder(out, resume=False, force=force, command=f"fedward study -> {out}", kind="study"):
        try:
            (out / MODELS_DIR).mkdir(parents=True, exist_ok=True)
            return ComparisonRun(study, out, console or Console(), verbose, stop).run()
        except OSError as err:
            raise io_error(Path(err.filename or out), err, "write") from err


def summary_table(doc: dict) -> Table:
    comp = doc["comparison"]
    label = METRIC_LABELS[comp["metric"]]
    table = Table(title=f"fedward study '{doc['study']['name']}': test {label} per site ({doc['status']})")
    table.add_column("site", no_wrap=True)
    for c in comp["columns"]:
        table.add_column(c, justify="right", no_wrap=True)
    for s, row in comp["rows"].items():
        table.add_row(
            f"[bold]{s}[/]" if s == "pooled" else s,
            *(fmt(row.get(c, {}).get(comp["metric"])) for c in comp["columns"]),
        )
    return table
