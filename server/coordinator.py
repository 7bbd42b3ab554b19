"""The coordinator's round loop: train with a Flower strategy, evaluate the global model at every site.

`run_study(grid, study, out_dir)` drives a whole study over any Flower Grid (simulation or deployment).
Each round it asks the strategy (Flower's FedAvg, FedProx or FedAdam) to configure training, sends the
messages, checks every update (finite, right keys and shapes), lets the strategy aggregate, then sends
the new global model to every connected site for evaluation. Site identity is kept from each reply's
`site` record all the way to results.json. After each round it writes a checkpoint and results.json,
so `resume=True` continues after the last finished round.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from common.config import ConfigError, StudyConfig, simulated_sites
from common.keys import Cfg, Met, Rec, Site
from common.metrics import HIST_BINS, pooled_summary, public_metrics
from common.models import build_model, save_model
from common.privacy import PrivacyKey
from server.store import RunStore

log = logging.getLogger("fedward.coordinator")
RESUME_IGNORED_KEYS = {"rounds", "source_path", "round_timeout_s", "study"}


class StudyStopped(RuntimeError):
    """The study cannot go on (too few sites): results so far are written, with the reason."""


class Reporter:
    """Progress callbacks; the CLI shows them live, the default only logs."""

    def start(self, study: StudyConfig, first_round: int) -> None: ...
    def phase(self, round_: int, text: str) -> None: ...
    def round_done(self, record: dict, round_s: float) -> None: ...

    def finish(self, results: dict) -> None: ...


@dataclass
class Replies:
    ok: list[Message] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    privacy: dict[str, dict] = field(default_factory=dict)  # site -> epsilon, delta, noise, steps
    silent: set[int] = field(default_factory=set)  # nodes that did not answer within round_timeout_s


def make_strategy(study: StudyConfig) -> FedAvg:
    common = dict(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=study.min_sites,
        min_evaluate_nodes=study.min_sites,
        min_available_nodes=study.min_sites,
    )
    s = study.strategy
    if s.name == "fedprox":
        return FedProx(proximal_mu=s.proximal_mu, **common)
    if s.name == "fedadam":
        return FedAdam(
            eta=s.server_lr,
            eta_l=s.server_lr_local,
            beta_1=s.beta_1,
            beta_2=s.beta_2,
            tau=s.tau,
            **common,
        )
    return FedAvg(**common)


def strategy_state(strategy: FedAvg) -> dict:
    """Server-side optimizer state a resumed study needs (FedAdam's moments); empty for FedAvg."""
    return {k: getattr(strategy, k) for k in ("m_t", "v_t") if getattr(strategy, k, None) is not None}


def check_update(update: ArrayRecord | None, reference: ArrayRecord) -> str | None:
    """Why a site's update cannot be aggregated (missing, wrong keys or shapes, NaN), or None."""
    if update is None:
        return "the reply carries no model arrays"
    if set(update.keys()) != set(reference.keys()):
        diff = sorted(set(update.keys()) ^ set(reference.keys()))[:5]
        return f"its arrays do not match the global model's (keys differ: {diff})"
    for key, arr in update.items():
        values = arr.numpy()
        if tuple(values.shape) != tuple(reference[key].shape):
            return f"array '{key}' has shape {values.shape}, expected {tuple(reference[key].shape)}"
        if not np.isfinite(values).all():
            return f"array '{key}' contains NaN or infinite values"
    return None


def short_reason(reason: str) -> str:
    """The useful end of a ClientApp's error (Flower sends the whole traceback)."""
    text = reason.replace("\\n", "\n")
    if "Message:" in text:
        text = text.rsplit("Message:", 1)[1]
    return " ".join(text.split())[-400:].strip(" '\"<>[]}")


def site_name(msg: Message) -> str:
    rec = msg.content.config_records.get(Rec.SITE) if not msg.has_error() else None
    return str(rec[Site.NAME]) if rec else f"node-{msg.metadata.src_node_id}"


class Coordinator:
    def __init__(
        self,
        grid: Grid,
        study: StudyConfig,
        out_dir: str | Path,
        reporter: Reporter | None = None,
        n_sites: int | None = None,
    ):
        self.grid, self.study = grid, study
        self.store = RunStore(out_dir)
        self.reporter = reporter or Reporter()
        self.n_sites = n_sites or (
            len(simulated_sites(study)) if study.data.source == "sites" else study.data.num_sites
        )
        self.node_site: dict[int, str] = {}
        self.model_meta: dict = {}
        self.study_id = ""

    # ------------------------------------------------------------------ messages

    def round_config(self, round_: int = 1) -> ConfigRecord:
        s = self.study
        return ConfigRecord(
            {
                Cfg.LOCAL_EPOCHS: s.train.local_epochs,
                Cfg.BATCH_SIZE: s.train.batch_size,
                Cfg.LR: s.train.lr * s.train.lr_decay ** max(round_ - 1, 0),
                Cfg.OPTIMIZER: s.train.optimizer,
                Cfg.AUGMENT: s.train.augment,
                Cfg.CLASS_BALANCE: s.train.class_balance,
                Cfg.MODEL: s.model.name,
                Cfg.IN_CHANNELS: self.model_meta["in_channels"],
                Cfg.NUM_CLASSES: self.model_meta["num_classes"],
                Cfg.SEED: s.seed,
                Cfg.STUDY_ID: self.study_id,
                Cfg.PLANNED_ROUNDS: s.rounds,
                Cfg.DP_ENABLED: s.privacy.enabled,
                **(self.privacy_config() if s.privacy.enabled else {}),
            }
        )

    def privacy_config(self) -> dict:
        """The privacy request every site checks against its own policy before training."""
        p = self.study.privacy
        config = {
            PrivacyKey.MAX_GRAD_NORM: p.max_grad_norm,
            PrivacyKey.DELTA: p.delta,
            PrivacyKey.TARGET_EPSILON: p.target_epsilon,
            PrivacyKey.GRAD_SAMPLE_MODE: p.grad_sample_mode,
            PrivacyKey.POISSON_SAMPLING: p.poisson_sampling,
            PrivacyKey.SECURE_MODE: p.secure_mode,
        }
        if p.noise_multiplier > 0:  # else each site derives it for the whole planned study
            config[PrivacyKey.NOISE_MULTIPLIER] = p.noise_multiplier
        return {str(k): v for k, v in config.items()}

    def send(self, messages: Iterable[Message]) -> list[Message]:
        return list(self.grid.send_and_receive(list(messages), timeout=self.study.round_timeout_s))

    def wait_for_sites(self, timeout_s: float = 600.0) -> list[int]:
        t0 = time.time()
        while len(nodes := list(self.grid.get_node_ids())) < self.n_sites:
            if time.time() - t0 > timeout_s:
                if len(nodes) >= self.study.min_sites:
                    log.warning("only %d of %d sites connected; starting anyway", len(nodes), self.n_sites)
                    break
                raise StudyStopped(f"only {len(nodes)} of {self.n_sites} sites connected in {timeout_s:.0f}s")
            time.sleep(0.5)
        return nodes

    def classify(self, replies: list[Message], reference: ArrayRecord | None, sent: list[Message]) -> Replies:
        """Sort replies into usable, refused and failed; a site that sent nothing back in time failed."""
        out = Replies()
        dst = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
        answered = {m.metadata.reply_to_message_id for m in replies}
        for node in sorted(dst[i] for i in dst.keys() - answered):  # e.g. a killed SuperNode
            name = self.node_site.get(node, f"node-{node}")
            out.silent.add(node)
            out.failed[name] = f"no reply within round_timeout_s={self.study.round_timeout_s:g}s"
            log.warning("site %s: %s", name, out.failed[name])
        for msg in replies:
            node = dst.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            name = site_name(msg) if not msg.has_error() else self.node_site.get(node, f"node-{node}")
            self.node_site[node] = name
            if msg.has_error():
                out.failed[name] = short_reason(msg.error.reason)
                log.warning("site %s failed: %s", name, msg.error.reason)
                continue
            metrics = msg.content.metric_records.get(Rec.METRICS)
            if metrics is not None and Met.EPSILON in metrics:
                out.privacy[name] = {
                    "epsilon": float(metrics[Met.EPSILON]),
                    "delta": float(metrics[Met.DELTA]),
                    "noise_multiplier": float(metrics.get(Met.NOISE_MULTIPLIER, 0.0)) or None,
                    "steps": int(metrics[Met.STEPS]),
                }
            refused = str(msg.content[Rec.SITE].get(Site.REFUSED, ""))
            if refused:
                out.refused[name] = refused
                log.warning("site %s refused: %s", name, refused)
                continue
            if reference is not None:
                problem = check_update(msg.content.array_records.get(Rec.ARRAYS), reference)
                if problem:
                    out.failed[name] = f"update rejected: {problem}"
                    log.warning("site %s: update rejected: %s", name, problem)
                    continue
            out.ok.append(msg)
        return out

    def evaluate_all(self, round_: int, arrays: ArrayRecord, skip: set[int] = frozenset()) -> dict:
        """Evaluate at every connected site but those in `skip` (silent in this round's training)."""
        self.reporter.phase(round_, "evaluating at every site")
        config = self.round_config()
        config[Cfg.SERVER_ROUND] = round_
        content = RecordDict({Rec.ARRAYS: arrays, Rec.CONFIG: config})
        msgs = [
            Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=n)
            for n in self.grid.get_node_ids()
            if n not in skip
        ]
        got = self.classify(self.send(msgs), None, msgs)
        summaries, eval_s = {}, {}
        for msg in got.ok:
            m = msg.content[Rec.METRICS]
            n_classes = self.model_meta["num_classes"]
            s = {
                "n_test": int(m[Met.N_TEST]),
                **{
                    k: (None if float(m[key]) < 0 else float(m[key]))
                    for k, key in (
                        ("auc", Met.AUC),
                        ("accuracy", Met.ACCURACY),
                        ("sensitivity", Met.SENSITIVITY),
                        ("specificity", Met.SPECIFICITY),
                        ("balanced_accuracy", Met.BALANCED_ACCURACY),
                    )
                },
                "confusion": np.asarray(m[Met.CONFUSION]).reshape(n_classes, n_classes),
                "score_hist": np.asarray(m[Met.SCORE_HIST]).reshape(n_classes, 2, HIST_BINS),
            }
            summaries[site_name(msg)] = s
            eval_s[site_name(msg)] = float(m[Met.EVAL_S])
        sites = {
            name: public_metrics({k: (np.nan if v is None else v) for k, v in s.items()})
            for name, s in sorted(summaries.items())
        }
        pooled = public_metrics(pooled_summary(list(summaries.values()))) if summaries else {}
        return {"sites": sites, "pooled": pooled, "eval_s": eval_s, "failed": got.failed}

    # ------------------------------------------------------------------ the study

    def run(self, *, resume: bool = False) -> dict:
        handler = self.store.attach_log()
        try:
            return self._run(resume)
        finally:
            RunStore.detach_log(handler)

    def _initial_state(self, resume: bool) -> tuple[int, ArrayRecord, dict, dict]:
        study = self.study
        ck = self.store.load_latest_checkpoint() if resume else None
        if resume and ck is None:
            log.warning("--resume: no checkpoint in %s; starting from round 1", self.store.dir)
        if ck is not None:
            old = {k: v for k, v in ck["study"].items() if k not in RESUME_IGNORED_KEYS}
            new = {k: v for k, v in study.to_dict().items() if k not in RESUME_IGNORED_KEYS}
            changed = sorted(k for k in new if old.get(k) != new.get(k))
            if changed:
                raise ConfigError(
                    f"cannot resume in {self.store.dir}: the study config differs from the "
                    f"checkpoint's in {changed}; use the same config or a new --out folder."
                )
            self.model_meta = ck["model_meta"]
            self.study_id = ck["results"]["study_id"]
            log.info("resuming after round %d from %s", ck["round"], self.store.dir)
            random.setstate(ck["python_rng"])
            return ck["round"] + 1, ArrayRecord(ck["arrays"]), ck["results"], ck["strategy_state"]
        classes, channels = _classes_and_channels(simulated_sites(study)[0])
        self.model_meta = {
            "model": study.model.name,
            "in_channels": channels,
            "num_classes": len(classes),
            "classes": classes,
        }
        model = build_model(study.model.name, in_channels=channels, num_classes=len(classes), seed=study.seed)
        self.study_id = f"{study.name}-{uuid.uuid4().hex[:8]}"
        results = {
            "study_id": self.study_id,
            "study": study.to_dict(),
            "status": "running",
            "rounds": [],
            "initial": {},
            "final": {},
            "timing": {"total_s": 0.0, "round_s": [], "train_s": {}, "eval_s": {}},
        }
        return 1, ArrayRecord(model.state_dict()), results, {}

    def _run(self, resume: bool) -> dict:
        study = self.study
        t_start = time.perf_counter()
        first, arrays, results, strat_state = self._initial_state(resume)
        elapsed_before = results["timing"]["total_s"]
        strategy = make_strategy(study)
        for k, v in strat_state.items():
            setattr(strategy, k, v)
        self.wait_for_sites()
        self.reporter.start(study, first)
        if first == 1:
            initial = self.evaluate_all(0, arrays)
            results["initial"] = {"sites": initial["sites"], "pooled": initial["pooled"]}
            self.store.write_results(results)
        for rnd in range(first, study.rounds + 1):
            t0 = time.perf_counter()
            self.reporter.phase(rnd, "training")
            messages = list(strategy.configure_train(rnd, arrays, self.round_config(rnd), self.grid))
            got = self.classify(self.send(messages), arrays, messages)
            if len(got.ok) < study.min_sites:
                reason = (
                    f"round {rnd}: only {len(got.ok)} site(s) returned a usable update "
                    f"(refused: {got.refused or 'none'}; failed: {got.failed or 'none'}); "
                    f"the study needs at least min_sites={study.min_sites}"
                )
                self._stop(results, reason, rnd, got)
                break
            new_arrays, _ = strategy.aggregate_train(rnd, got.ok)
            if new_arrays is not None:
                arrays = new_arrays
            evaluation = self.evaluate_all(rnd, arrays, skip=got.silent)
            round_s = time.perf_counter() - t0
            record = self._round_record(rnd, got, evaluation)
            if study.privacy.enabled:
                self._add_privacy(results, record, got)
            results["rounds"].append(record)
            self._add_timing(results, rnd, got, evaluation, round_s)
            results["timing"]["total_s"] = elapsed_before + time.perf_counter() - t_start
            self.store.save_checkpoint(
                rnd,
                {
                    "round": rnd,
                    "arrays": arrays.to_torch_state_dict(),
                    "results": results,
                    "strategy_state": strategy_state(strategy),
                    "study": study.to_dict(),
                    "model_meta": self.model_meta,
                    "python_rng": random.getstate(),
                },
            )
            self.store.write_results(results)
            log.info(
                "round %d/%d done in %.1fs: pooled AUC %s; sites %s; trained: %s; refused: %s; failed: %s",
                rnd, study.rounds, round_s, record["pooled"].get("auc"),
                {k: v["auc"] for k, v in record["sites"].items()}, record["participants"],
                record["refused"] or "none", record["failed"] or "none",
            )  # fmt: skip
            self.reporter.round_done(record, round_s)
        last = results["rounds"][-1] if results["rounds"] else results["initial"]
        results["final"] = {
            "sites": last.get("sites", {}),
            "pooled": last.get("pooled", {}),
            "round": last.get("round", 0),
        }
        if results["status"] == "running":
            results["status"] = "completed"
        results["timing"]["total_s"] = elapsed_before + time.perf_counter() - t_start
        model = build_model(
            study.model.name,
            in_channels=self.model_meta["in_channels"],
            num_classes=self.model_meta["num_classes"],
        )
        model.load_state_dict(arrays.to_torch_state_dict())
        save_model(
            self.store.final_model_path,
            model,
            meta={**self.model_meta, "round": results["final"]["round"], "study": study.to_dict()},
        )
        self.store.write_results(results)
        self.reporter.finish(results)
        return results

    def _stop(self, results: dict, reason: str, rnd: int, got: Replies) -> None:
        log.error("study stopped: %s", reason)
        results["status"] = "stopped"
        results["stop_reason"] = reason
        results.setdefault("stopped_rounds", []).append(
            {"round": rnd, "refused": got.refused, "failed": got.failed}
        )

    @staticmethod
    def _add_privacy(results: dict, record: dict, got: Replies) -> None:
        """Per site: epsilon spent so far, delta, this round's noise and steps, and any refusal."""
        previous = results["rounds"][-1]["sites"] if results["rounds"] else {}
        for site, metrics in record["sites"].items():
            known = got.privacy.get(site)
            before = previous.get(site, {})
            metrics.update(
                {
                    "epsilon": known["epsilon"] if known else before.get("epsilon", 0.0),
                    "delta": known["delta"] if known else before.get("delta"),
                    "noise_multiplier": known["noise_multiplier"] if known else None,
                    "steps": known["steps"] if known else 0,
                    "refused": got.refused.get(site),
                }
            )

    @staticmethod
    def _round_record(rnd: int, got: Replies, evaluation: dict) -> dict:
        train = {}
        for msg in got.ok:
            m = msg.content[Rec.METRICS]
            train[site_name(msg)] = {
                "n_train": int(m[Met.NUM_EXAMPLES]),
                "loss": float(m[Met.TRAIN_LOSS]),
                "train_s": float(m[Met.TRAIN_S]),
            }
        return {
            "round": rnd,
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "sites": evaluation["sites"],
            "pooled": evaluation["pooled"],
            "participants": sorted(train),
            "train": dict(sorted(train.items())),
            "refused": got.refused,
            "failed": {
                **got.failed,
                **{k: f"evaluation: {v}" for k, v in evaluation["failed"].items()},
            },
        }

    @staticmethod
    def _add_timing(results: dict, rnd: int, got: Replies, evaluation: dict, round_s: float) -> None:
        timing = results["timing"]
        timing["round_s"].append(round(round_s, 4))
        trained = {site_name(m): float(m.content[Rec.METRICS][Met.TRAIN_S]) for m in got.ok}
        n_before = rnd - 1
        for key, values in (("train_s", trained), ("eval_s", evaluation["eval_s"])):
            for site in set(timing[key]) | set(values):
                series = timing[key].setdefault(site, [None] * n_before)
                series += [None] * (n_before - len(series))
                series.append(round(values[site], 4) if site in values else None)


def _classes_and_channels(site) -> tuple[list[str], int]:
    """The model's classes and input channels, from the study's first site (all sites agree)."""
    if site.data.format == "synthetic":
        return ["normal", "finding"], 1
    if site.data.format == "medmnist":
        from common.data import load_npz

        data = load_npz(site.data.path)
        n = int(max(data["train_labels"].max(), data["test_labels"].max()) + 1)
        return site.data.classes or [str(c) for c in range(n)], 1
    return list(site.data.classes), int(site.data.preprocess.channels)


def run_study(
    grid: Grid,
    study: StudyConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    reporter: Reporter | None = None,
    n_sites: int | None = None,
) -> dict:
    """Run a study over `grid`; `n_sites` (default: the study's) is how many sites to wait for."""
    return Coordinator(grid, study, out_dir, reporter, n_sites=n_sites).run(resume=resume)
