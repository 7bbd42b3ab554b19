"""The coordinator's round loop: train with a Flower strategy, evaluate the global model at every site.

`run_study(grid, study, out_dir, ...)` drives a whole study over any Flower Grid (simulation or
deployment). Each round it asks the strategy (Flower's FedAvg, FedProx or FedAdam) to configure training,
sends the messages, sorts and checks the replies (server.replies), lets the strategy aggregate, then sends
the new global model to every connected site for evaluation. Site identity is kept from each reply's
`site` record all the way to results.json. After each round it writes a checkpoint and results.json,
so `resume=True` continues after the last finished round. A StopRequest (server.interrupt: Ctrl-C,
SIGTERM) ends the study between two polls for replies: the round under way is abandoned and
results.json says `status: interrupted`, the round reached and the command that resumes it.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx

from common.keys import Cfg, Met, Rec, Site
from common.model_spec import ModelSpec
from common.models import build_model, save_model
from common.privacy import request_config
from common.round import RoundPlan
from common.schema import SERVER_LR_DEFAULTS, StudyConfig
from server.interrupt import Interrupted, StopRequest
from server.model_card import write_model_package
from server.operating_point import operating_point
from server.packages import starting_point
from server.releases import pooled_metrics, site_metrics, site_release
from server.replies import Replies, classify, site_name
from server.round_records import (
    add_privacy,
    add_timing,
    check_resumable,
    record_stop,
    round_record,
    warn_budget_passed,
)
from server.run_folder import Results, io_error, new_results
from server.scaffold import Scaffold
from server.store import RunStore

log = logging.getLogger("fedward.coordinator")
PULL_INTERVAL_S = 0.2  # how often the coordinator asks for replies


class StudyStopped(RuntimeError):
    """The study cannot go on (too few sites): results so far are written, with the reason."""


class Reporter:
    """Progress callbacks; the CLI shows them live, the default only logs."""

    def start(self, study: StudyConfig, first_round: int) -> None: ...
    def phase(self, round_: int, text: str) -> None: ...
    def round_done(self, record: dict, round_s: float) -> None: ...

    def finish(self, results: dict) -> None: ...


def make_strategy(
    study: StudyConfig, *, model_meta: dict | None = None, node_site: dict | None = None
) -> FedAvg:
    """The study's Flower strategy; SCAFFOLD needs the model (`model_meta`: its channels and classes)
    for the names of its trainable weights, and the coordinator's map of node ids to site names."""
    common = dict(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=study.min_sites,
        min_evaluate_nodes=study.min_sites,
        min_available_nodes=study.min_sites,
        weighted_by_key=Met.SITE_WEIGHT if study.strategy.weighting == "sites" else Met.NUM_EXAMPLES,
    )
    s = study.strategy
    if s.name == "fedprox":
        return FedProx(proximal_mu=s.proximal_mu, **common)
    server_lr = s.server_lr or SERVER_LR_DEFAULTS.get(s.name, 0.0)
    if s.name == "fedavgm":
        return FedAvgM(server_learning_rate=server_lr, server_momentum=s.server_momentum, **common)
    if s.name == "fedadam":
        return FedAdam(
            eta=server_lr,
            eta_l=s.server_lr_local,
            beta_1=s.beta_1,
            beta_2=s.beta_2,
            tau=s.tau,
            **common,
        )
    if s.name == "scaffold":
        model = build_model(study.model.name, in_channels=model_meta["in_channels"],
                            num_classes=model_meta["num_classes"])  # fmt: skip
        trainable = [name for name, p in model.named_parameters() if p.requires_grad]
        return Scaffold(parameters=trainable, node_site={} if node_site is None else node_site, **common)
    return FedAvg(**common)


def strategy_state(strategy: FedAvg) -> dict:
    """Server-side state a resumed study needs (FedAdam's moments, FedAvgM's momentum, SCAFFOLD's
    control variates); empty for FedAvg."""
    if isinstance(strategy, Scaffold):
        return strategy.state()
    kept = ("m_t", "v_t", "momentum_vector")
    return {k: getattr(strategy, k) for k in kept if getattr(strategy, k, None) is not None}


class Coordinator:
    """One study over `grid`: `classes` and `in_channels` say what model to build, `n_sites` how many
    sites to wait for before round 1."""

    def __init__(
        self,
        grid: Grid,
        study: StudyConfig,
        out_dir: str | Path,
        *,
        spec: ModelSpec,
        n_sites: int,
        reporter: Reporter | None = None,
        stop: StopRequest | None = None,
        resume_command: str = "",
    ):
        self.grid, self.study, self.n_sites = grid, study, n_sites
        self.stop = stop or StopRequest()
        self.resume_command = resume_command
        self.store = RunStore(out_dir)
        self.reporter = reporter or Reporter()
        self.node_site: dict[int, str] = {}
        self.model_meta = {
            "model": study.model.name,
            "task": spec.task,
            "in_channels": spec.in_channels,
            "num_classes": spec.num_classes,
            "classes": list(spec.classes),
            "size": list(spec.size),
        }
        self.headline = "dice" if spec.task == "segmentation" else "auc"  # the metric the log shows
        self.study_id = ""
        self.test_releases: dict[str, dict] = {}  # the newest test evaluation's releases, per site
        self.average: dict | None = None  # strategy.ema_decay: the moving average of the global models

    # ------------------------------------------------------------------ messages

    def round_config(self, round_: int = 1) -> ConfigRecord:
        """The round's ConfigRecord: its RoundPlan and, with privacy, the privacy request."""
        plan = RoundPlan.from_study(
            self.study,
            round_,
            in_channels=self.model_meta["in_channels"],
            num_classes=self.model_meta["num_classes"],
            study_id=self.study_id,
            classes=tuple(self.model_meta["classes"]),
            size=tuple(self.model_meta.get("size", ())),
        )
        privacy = request_config(self.study.privacy) if self.study.privacy.enabled else {}
        return ConfigRecord({**plan.to_config(), **privacy})

    def send(self, messages: list[Message]) -> list[Message]:
        """Send and wait for the replies, until all came or round_timeout_s passed.

        Flower's own `send_and_receive` waits 3 s between pulls over a deployment's SuperLink, which
        adds up to 3 s to every phase of every round; this polls every PULL_INTERVAL_S instead."""
        ids = set(self.grid.push_messages(messages))
        deadline = time.monotonic() + self.study.round_timeout_s
        replies: list[Message] = []
        while ids:
            self.stop.check()
            got = list(self.grid.pull_messages(ids))
            replies += got
            ids -= {m.metadata.reply_to_message_id for m in got}
            if not ids or time.monotonic() >= deadline:
                break
            time.sleep(PULL_INTERVAL_S)
        self.stop.check()  # replies that came after a stop request (a site killed by Ctrl-C) are not the site's fault
        return replies

    def classify(self, replies: list[Message], sent: list[Message], reference: ArrayRecord | None) -> Replies:
        return classify(
            replies, sent, reference=reference, node_site=self.node_site, timeout_s=self.study.round_timeout_s
        )

    def wait_for_sites(self, timeout_s: float = 600.0) -> list[int]:
        t0 = time.time()
        while len(nodes := list(self.grid.get_node_ids())) < self.n_sites:
            self.stop.check()
            if time.time() - t0 > timeout_s:
                if len(nodes) >= self.study.min_sites:
                    log.warning("only %d of %d sites connected; starting anyway", len(nodes), self.n_sites)
                    break
                raise StudyStopped(f"only {len(nodes)} of {self.n_sites} sites connected in {timeout_s:.0f}s")
            time.sleep(0.5)
        return nodes

    def evaluate_all(
        self, round_: int, arrays: ArrayRecord, skip: set[int] = frozenset(), split: str = "test"
    ) -> dict:
        """Evaluate at every connected site but those in `skip` (silent in this round's training), on
        each site's `split` (test, or val for the operating point)."""
        self.reporter.phase(round_, "evaluating at every site")
        config = self.round_config(max(min(round_, self.study.rounds), 1))
        config[Cfg.SERVER_ROUND] = round_
        config[Cfg.EVAL_SPLIT] = split
        content = RecordDict({Rec.ARRAYS: arrays, Rec.CONFIG: config})
        msgs = [
            Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=n)
            for n in self.grid.get_node_ids()
            if n not in skip
        ]
        got = self.classify(self.send(msgs), msgs, None)
        n_classes = self.model_meta["num_classes"]
        releases, sites, eval_s = {}, {}, {}
        for msg in got.ok:
            name, m = site_name(msg), msg.content[Rec.METRICS]
            kind = str(msg.content[Rec.SITE].get(Site.RELEASE, "") or "exact")
            releases[name] = site_release(kind, m, n_classes)
            sites[name] = site_metrics(releases[name], m)
            if Met.EVAL_S in m:  # a site whose release is protected does not say how long it took
                eval_s[name] = float(m[Met.EVAL_S])
        failed = {**got.failed, **{k: f"refused: {v}" for k, v in got.refused.items()}}
        if split == "test":
            self.test_releases = releases
        return {
            "releases": releases,
            "sites": dict(sorted(sites.items())),
            "pooled": pooled_metrics(releases),
            "eval_s": eval_s,
            "failed": failed,
        }

    # ------------------------------------------------------------------ the study

    def run(self, *, resume: bool = False) -> Results:
        """Run the study; an I/O failure in the run folder (a full disk) raises RunFolderError naming
        the file, and leaves the files written before it intact."""
        try:
            handler = self.store.attach_log()
        except OSError as err:
            raise io_error(self.store.log_path, err, "write") from err
        try:
            return self._run(resume)
        except OSError as err:
            raise io_error(Path(err.filename or self.store.dir), err, "write") from err
        finally:
            RunStore.detach_log(handler)

    def _run(self, resume: bool) -> Results:
        t_start = time.perf_counter()
        first, arrays, results, strat_state = self._initial_state(resume)
        elapsed_before = results["timing"]["total_s"]
        try:
            return self._rounds(first, arrays, results, strat_state, t_start - elapsed_before)
        except Interrupted as why:
            self._interrupted(results, str(why), elapsed_before + time.perf_counter() - t_start)
            return results

    def _interrupted(self, results: Results, signal_name: str, total_s: float) -> None:
        reached = results["rounds"][-1]["round"] if results["rounds"] else 0
        results["status"] = "interrupted"
        results["interrupted"] = {
            "signal": signal_name,
            "round_reached": reached,
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "resume": self.resume_command,
        }
        results["timing"]["total_s"] = total_s
        self.store.write_results(results)
        log.info(
            "interrupted by %s after round %d of %d; continue with: %s",
            signal_name, reached, self.study.rounds, self.resume_command or "--resume",
        )  # fmt: skip

    def _rounds(
        self, first: int, arrays: ArrayRecord, results: Results, strat_state: dict, t_origin: float
    ) -> Results:
        """Rounds `first`..study.rounds, then the final model; `t_origin`: when the run started, on
        perf_counter's clock, counting the time of the rounds before a resume."""
        strategy = make_strategy(self.study, model_meta=self.model_meta, node_site=self.node_site)
        for k, v in strat_state.items():
            setattr(strategy, k, v)
        self.wait_for_sites()
        self.reporter.start(self.study, first)
        if first == 1:
            initial = self.evaluate_all(0, arrays)
            results["initial"] = {"sites": initial["sites"], "pooled": initial["pooled"]}
            self.store.write_results(results)
        for rnd in range(first, self.study.rounds + 1):
            t0 = time.perf_counter()
            new_arrays = self._round(rnd, strategy, arrays, results)
            if new_arrays is None:
                break
            arrays = new_arrays
            results["timing"]["total_s"] = time.perf_counter() - t_origin
            self._save(rnd, arrays, results, strategy)
            self.reporter.round_done(results["rounds"][-1], results["timing"]["round_s"][-1])
            log.debug("round %d took %.1fs", rnd, time.perf_counter() - t0)
            self.stop.check()
        results["timing"]["total_s"] = time.perf_counter() - t_origin
        self._finish(results, ArrayRecord(self.average) if self.average is not None else arrays)
        return results

    def averaged(self, arrays: ArrayRecord) -> ArrayRecord:
        """With `strategy.ema_decay` d > 0, the moving average of the global models (average = d x average
        + (1 - d) x this round's), which is what is evaluated and packaged; training goes on from the
        round's own model. Only the coordinator's own values enter it: no privacy is spent."""
        decay = self.study.strategy.ema_decay
        if decay <= 0:
            return arrays
        current = arrays.to_torch_state_dict()
        if self.average is None:
            self.average = {k: v.clone() for k, v in current.items()}
        else:
            for k, v in current.items():
                floating = v.is_floating_point()
                self.average[k] = decay * self.average[k] + (1 - decay) * v if floating else v.clone()
        return ArrayRecord(self.average)

    def _round(self, rnd: int, strategy: FedAvg, arrays: ArrayRecord, results: Results) -> ArrayRecord | None:
        """Train round `rnd` and evaluate its model everywhere; the new global arrays, or None when the
        study had to stop (too few usable updates: results say why)."""
        t0 = time.perf_counter()
        self.reporter.phase(rnd, "training")
        messages = list(strategy.configure_train(rnd, arrays, self.round_config(rnd), self.grid))
        got = self.classify(self.send(messages), messages, arrays)
        if len(got.ok) < self.study.min_sites:
            reason = (
                f"round {rnd}: only {len(got.ok)} site(s) returned a usable update "
                f"(refused: {got.refused or 'none'}; failed: {got.failed or 'none'}); "
                f"the study needs at least min_sites={self.study.min_sites}"
            )
            record_stop(results, reason, rnd, got)
            return None
        results.setdefault("site_inputs", {}).update(got.inputs)  # for the package (server.model_card)
        if strategy.weighted_by_key == Met.SITE_WEIGHT:  # strategy.weighting `sites` (make_strategy)
            for reply in got.ok:  # set here, over any value a site sent: a site cannot weigh more
                reply.content[Rec.METRICS][Met.SITE_WEIGHT] = 1
        new_arrays, _ = strategy.aggregate_train(rnd, got.ok)
        arrays = new_arrays if new_arrays is not None else arrays
        evaluation = self.evaluate_all(rnd, self.averaged(arrays), skip=got.silent)
        round_s = time.perf_counter() - t0
        record = round_record(rnd, got, evaluation)
        if self.study.privacy.enabled:
            add_privacy(results, record, got)
            privacy = self.study.privacy  # a target only where the noise was derived from it
            warn_budget_passed(results, record, None if privacy.noise_multiplier else privacy.target_epsilon)
        results["rounds"].append(record)
        add_timing(results, rnd, got, evaluation, round_s)
        log.info(
            "round %d/%d done in %.1fs: pooled %s %s; sites %s; trained: %s; refused: %s; failed: %s",
            rnd, self.study.rounds, round_s, self.headline, record["pooled"].get(self.headline),
            {k: v.get(self.headline) for k, v in record["sites"].items()}, record["participants"],
            record["refused"] or "none", record["failed"] or "none",
        )  # fmt: skip
        return arrays

    def _initial_state(self, resume: bool) -> tuple[int, ArrayRecord, Results, dict]:
        """(first round, global arrays, results so far, strategy state): from the newest checkpoint when
        resuming, else the `model.init_from` package's weights or a fresh model, and empty results."""
        ck = self.store.load_latest_checkpoint() if resume else None
        if resume and ck is None:
            log.warning("--resume: no checkpoint in %s; starting from round 1", self.store.dir)
        if ck is not None:
            check_resumable(ck["study"], self.study, self.store.dir)
            self.model_meta = ck["model_meta"]
            self.study_id = ck["results"]["study_id"]
            self.average = ck.get("average")
            log.info("resuming after round %d from %s", ck["round"], self.store.dir)
            random.setstate(ck["python_rng"])
            return ck["round"] + 1, ArrayRecord(ck["arrays"]), ck["results"], ck["strategy_state"]
        self.study_id = f"{self.study.name}-{uuid.uuid4().hex[:8]}"
        results = new_results(self.study_id, self.study.to_dict())
        meta = self.model_meta
        model, origin = starting_point(
            self.study, in_channels=meta["in_channels"], num_classes=meta["num_classes"]
        )
        results.update(origin)  # init_from / pretrained_from and the lineage, when a package started it
        if "init_from" in origin:
            log.info("starting from the package %s (study %s)", origin["init_from"]["package"],
                     origin["init_from"]["study_id"])  # fmt: skip
        return 1, ArrayRecord(model.state_dict()), results, {}

    def _save(self, rnd: int, arrays: ArrayRecord, results: Results, strategy: FedAvg) -> None:
        self.store.save_checkpoint(
            rnd,
            {
                "round": rnd,
                "arrays": arrays.to_torch_state_dict(),
                "results": results,
                "strategy_state": strategy_state(strategy),
                "study": self.study.to_dict(),
                "model_meta": self.model_meta,
                "python_rng": random.getstate(),
                "average": self.average,
            },
        )
        self.store.write_results(results)

    def _choose_operating_point(self, results: Results, arrays: ArrayRecord) -> None:
        """Binary models: a threshold from one more release, of each site's validation split."""
        if (
            self.model_meta["num_classes"] != 2
            or self.model_meta.get("task") == "segmentation"  # no threshold: each pixel's arg-max
            or self.study.operating_point.rule == "none"
            or not results["rounds"]
        ):
            return
        val = self.evaluate_all(self.study.rounds + 1, arrays, split="val")
        chosen = operating_point(val["releases"], self.test_releases, self.study.operating_point)
        if chosen is not None and val["failed"]:
            chosen["validation"]["not_released"] = val["failed"]
        results["operating_point"] = chosen

    def _finish(self, results: Results, arrays: ArrayRecord) -> None:
        if results["status"] == "running":
            self._choose_operating_point(results, arrays)
        last = results["rounds"][-1] if results["rounds"] else results["initial"]
        results["final"] = {
            "sites": last.get("sites", {}),
            "pooled": last.get("pooled", {}),
            "round": last.get("round", 0),
        }
        if results["status"] == "running":
            results["status"] = "completed"
        meta = self.model_meta
        model = build_model(
            self.study.model.name, in_channels=meta["in_channels"], num_classes=meta["num_classes"]
        )
        model.load_state_dict(arrays.to_torch_state_dict())
        save_model(
            self.store.final_model_path,
            model,
            meta={**meta, "round": results["final"]["round"], "study": self.study.to_dict()},
        )
        write_model_package(self.store.dir, model, self.study, meta, results)  # what hospitals get
        self.store.write_results(results)
        self.reporter.finish(results)


def run_study(
    grid: Grid,
    study: StudyConfig,
    out_dir: str | Path,
    *,
    spec: ModelSpec,
    n_sites: int,
    resume: bool = False,
    reporter: Reporter | None = None,
    stop: StopRequest | None = None,
    resume_command: str = "",
) -> Results:
    """Run a study over `grid`, waiting for `n_sites` sites; the model is `spec` (common.model_spec)."""
    coordinator = Coordinator(
        grid, study, out_dir, spec=spec, n_sites=n_sites,
        reporter=reporter, stop=stop, resume_command=resume_command,
    )  # fmt: skip
    return coordinator.run(resume=resume)
