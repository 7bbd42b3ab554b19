"""The hospital site: Flower ClientApp handlers that only convert records and call plain functions.

Which site this node is comes from the node's own config: `site-config` (path to the site's YAML) in
deployment. In simulation the engine only gives each node a `partition-id`; the site is then the
partition-id-th site of the study (from `fedward simulate`, or from the run config's study file).

Run it through `fedward simulate`, `flwr run .`, or a SuperNode (`flower-supernode ... --node-config
"site-config='/etc/fedward/site.yaml'"`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import guard
from client.dp import make_private_for
from client.train import device, make_criterion, make_optimizer, predict, train_epochs, train_loader
from common.config import SiteConfig, load_site
from common.data import SiteData, load_site_data
from common.keys import Cfg, Met, Rec, Site
from common.metrics import site_summary
from common.models import build_model
from common.transforms import augment_fn

log = logging.getLogger("fedward.site")
_RUNTIMES: dict[str, SiteRuntime] = {}  # per process: data and model stay loaded across rounds


@dataclass
class SiteRuntime:
    config: SiteConfig
    data: SiteData
    model: torch.nn.Module | None = None
    model_key: tuple = ()
    augment: Callable | None = None  # the site's own training augmentation (site config)

    def model_for(self, cfg: ConfigRecord) -> torch.nn.Module:
        key = (str(cfg[Cfg.MODEL]), int(cfg[Cfg.IN_CHANNELS]), int(cfg[Cfg.NUM_CLASSES]))
        if self.model is None or key != self.model_key:
            self.model = build_model(key[0], in_channels=key[1], num_classes=key[2]).to(device())
            self.model_key = key
        return self.model


def site_config_from_context(context: Context, sites: list[SiteConfig] | None = None) -> SiteConfig:
    """This node's site config: node config `site-config` first, else the simulated partition."""
    if "site-config" in context.node_config:
        return load_site(str(context.node_config["site-config"]))
    if "partition-id" not in context.node_config:
        raise RuntimeError(
            "this SuperNode has no site config: start it with "
            "--node-config \"site-config='/path/to/site.yaml'\""
        )
    pid = int(context.node_config["partition-id"])
    if sites is None:
        from common.config import simulated_sites
        from server.runconfig import study_from_run_config  # simulation through `flwr run .`

        sites = simulated_sites(study_from_run_config(context.run_config))
    return sites[pid]


def runtime_for(config: SiteConfig) -> SiteRuntime:
    key = f"{config.site}:{config.source_path}:{config.data}"
    if key not in _RUNTIMES:
        cpus = os.environ.get("FEDWARD_SITE_THREADS")
        if cpus:
            torch.set_num_threads(int(cpus))
        _RUNTIMES[key] = SiteRuntime(
            config=config, data=load_site_data(config), augment=augment_fn(config.data)
        )
    return _RUNTIMES[key]


def _reply(msg: Message, site: str, records: dict) -> Message:
    content = RecordDict({**records, Rec.SITE: ConfigRecord({Site.NAME: site, Site.REFUSED: ""})})
    return Message(content, reply_to=msg)


def handle_train(msg: Message, rt: SiteRuntime) -> Message:
    cfg = msg.content[Rec.CONFIG]
    private = bool(cfg.get(Cfg.DP_ENABLED, False))
    # with privacy, the budget check to the ledger line is one step: one training at a time per ledger
    with guard.site_lock(rt.config) if private else contextlib.nullcontext():
        return _train(msg, rt, cfg, private)


def _train(msg: Message, rt: SiteRuntime, cfg, private: bool) -> Message:
    rnd = int(cfg[Cfg.SERVER_ROUND])
    plan = None
    if private:
        plan, refusal = guard.plan_round(cfg, rt.config, len(rt.data.train_y))
        if refusal:
            log.warning(refusal)
            return _refuse(msg, rt, refusal)
    model = rt.model_for(cfg)
    model.load_state_dict(msg.content[Rec.ARRAYS].to_torch_state_dict())
    seed = int(cfg.get(Cfg.SEED, 0)) * 1000 + rnd
    loader = train_loader(rt.data.train_x, rt.data.train_y, int(cfg[Cfg.BATCH_SIZE]), seed)
    optimizer = make_optimizer(model, str(cfg[Cfg.OPTIMIZER]), float(cfg[Cfg.LR]))
    balanced = bool(cfg.get(Cfg.CLASS_BALANCE, False))
    criterion = make_criterion(rt.data.train_y, int(cfg[Cfg.NUM_CLASSES]), balanced).to(device())
    dp, entry = None, None
    if plan is not None:
        dp = make_private_for(
            plan.request, model=model, optimizer=optimizer, data_loader=loader, criterion=criterion
        )
        model, loader, optimizer, criterion = dp.model, dp.data_loader, dp.optimizer, dp.criterion
    try:
        result = train_epochs(
            model,
            loader,
            optimizer,
            criterion=criterion,
            epochs=int(cfg[Cfg.LOCAL_EPOCHS]),
            proximal_mu=float(cfg.get(Cfg.PROXIMAL_MU, 0.0)),
            use_augment=bool(cfg.get(Cfg.AUGMENT, False)),
            augment_fn=rt.augment,
            seed=seed,
            private=dp is not None,
        )
    finally:
        if dp is not None:  # count every step taken, even if training broke off
            if dp.steps:
                entry = guard.record_round(plan, dp)
            rt.model = model = dp.unwrap()
    metrics = {
        Met.NUM_EXAMPLES: len(rt.data.train_y),
        Met.TRAIN_LOSS: result.loss,
        Met.TRAIN_S: result.seconds,
    }
    if entry is not None:
        metrics.update(
            {
                Met.EPSILON: plan.accountant.epsilon(entry.delta),
                Met.DELTA: entry.delta,
                Met.NOISE_MULTIPLIER: entry.noise_multiplier,
                Met.STEPS: entry.steps,
                Met.SAMPLE_RATE: entry.sample_rate,
            }
        )
    log.info("site %s round %d: loss %.4f in %.1fs", rt.config.site, rnd, result.loss, result.seconds)
    records = {Rec.ARRAYS: ArrayRecord(model.state_dict()), Rec.METRICS: MetricRecord(metrics)}
    return _reply(msg, rt.config.site, records)


def _refuse(msg: Message, rt: SiteRuntime, reason: str) -> Message:
    epsilon, delta = guard.spent(rt.config)
    metrics = MetricRecord({Met.NUM_EXAMPLES: 0, Met.EPSILON: epsilon, Met.DELTA: delta, Met.STEPS: 0})
    content = RecordDict(
        {Rec.METRICS: metrics, Rec.SITE: ConfigRecord({Site.NAME: rt.config.site, Site.REFUSED: reason})}
    )
    return Message(content, reply_to=msg)


def handle_evaluate(msg: Message, rt: SiteRuntime) -> Message:
    cfg = msg.content[Rec.CONFIG]
    model = rt.model_for(cfg)
    model.load_state_dict(msg.content[Rec.ARRAYS].to_torch_state_dict())
    t0 = time.perf_counter()
    summary = site_summary(rt.data.test_y.numpy(), predict(model, rt.data.test_x))
    metrics = MetricRecord(
        {
            Met.NUM_EXAMPLES: summary["n_test"],
            Met.N_TEST: summary["n_test"],
            Met.AUC: _num(summary["auc"]),
            Met.ACCURACY: _num(summary["accuracy"]),
            Met.SENSITIVITY: _num(summary["sensitivity"]),
            Met.SPECIFICITY: _num(summary["specificity"]),
            Met.BALANCED_ACCURACY: _num(summary["balanced_accuracy"]),
            Met.CONFUSION: summary["confusion"].reshape(-1).tolist(),
            Met.SCORE_HIST: summary["score_hist"].reshape(-1).tolist(),
            Met.EVAL_S: time.perf_counter() - t0,
        }
    )
    return _reply(msg, rt.config.site, {Rec.METRICS: metrics})


def _num(x: float) -> float:
    return -1.0 if np.isnan(x) else float(x)  # MetricRecord has no NaN; -1 marks "undefined"


def make_client_app(sites: list[SiteConfig] | None = None) -> ClientApp:
    """A ClientApp; `sites` (partition order) is given by `fedward simulate`, else read from context."""
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, runtime_for(site_config_from_context(context, sites)))

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, runtime_for(site_config_from_context(context, sites)))

    return client_app


app = make_client_app()
