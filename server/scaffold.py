"""SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning",
ICML 2020) as a Flower strategy whose control variates never leave the coordinator.

Each site i has a control variate c_i (its average local step direction), the federation c (their
mean over all sites). Every round a site gets the global model x and its correction c - c_i
(common.keys.CORRECTION_PREFIX keys; client.scaffold_correction applies it after every local step, so it never
enters DP-SGD's clipped, noised gradient). From the update y_i it sends back, as it always does, and
the number of steps K_i it took at the round's learning rate lr, SCAFFOLD's second option gives

    c_i+ = c_i - c + (x - y_i) / (K_i lr)        c+ = the mean of every site's c_i

which with plain SGD is the mean of the site's gradients over its steps, and with Adam the mean of
its steps' directions. Everything is computed here from what the sites already send: SCAFFOLD adds
nothing to a site's release, private or not. The global model is FedAvg's weighted average.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.keys import CORRECTION_PREFIX, Cfg, Met, Rec, Site


class Scaffold(FedAvg):
    """FedAvg with SCAFFOLD's drift correction over `parameters` (the model's trainable weights).
    `node_site`: the coordinator's map of node ids to site names (server.replies fills it from the
    sites' replies); the control variates are kept by site name, so they survive a restart in which
    nodes come back with new ids."""

    def __init__(self, *, parameters: list[str], node_site: Mapping[int, str], **fedavg):
        super().__init__(**fedavg)
        self.parameters, self.node_site = list(parameters), node_site
        self.control: dict[str, np.ndarray] = {}  # c: the mean of the sites' c_i
        self.site_controls: dict[str, dict[str, np.ndarray]] = {}  # c_i by site name
        self._sent: dict[str, np.ndarray] = {}  # x: this round's global weights
        self._applied: dict[int, dict[str, np.ndarray]] = {}  # the correction each node was sent
        self._lr = 0.0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._sent = {k: arrays[k].numpy().astype(np.float64) for k in self.parameters}
        self._lr = float(config[Cfg.LR])
        if not self.control:
            self.control = {k: np.zeros_like(v) for k, v in self._sent.items()}
        return [self._with_correction(m, arrays, config) for m in messages]

    def _correction(self, node: int) -> dict[str, np.ndarray]:
        """c - c_i for the site at `node` (c for a site without a c_i yet); zero for a node not yet
        known by name while some sites have controls (after a restart): one round uncorrected."""
        site = self.node_site.get(node)
        if site is None and self.site_controls:
            return {k: np.zeros_like(c) for k, c in self.control.items()}
        mine = self.site_controls.get(site)
        return {k: c - mine[k] if mine else c.copy() for k, c in self.control.items()}

    def _with_correction(self, message: Message, arrays: ArrayRecord, config: ConfigRecord) -> Message:
        node = message.metadata.dst_node_id
        self._applied[node] = self._correction(node)
        correction = {
            CORRECTION_PREFIX + k: Array(v.astype(arrays[k].numpy().dtype))
            for k, v in self._applied[node].items()
        }
        content = RecordDict(
            {Rec.ARRAYS: ArrayRecord({**dict(arrays.items()), **correction}), Rec.CONFIG: config}
        )
        return Message(content=content, message_type=message.metadata.message_type, dst_node_id=node)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's model; each replying site's c_i+ = (x - y_i) / (K_i lr) - (the correction it was
        sent), which is option II's c_i - c + (x - y_i) / (K_i lr); then c = the mean of every c_i."""
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        for reply in replies:
            steps = int(reply.content[Rec.METRICS].get(Met.STEPS, 0))
            applied = self._applied.get(reply.metadata.src_node_id)
            if steps <= 0 or applied is None:  # (the round's lr is > 0: config validation)
                continue  # no steps taken: nothing learned about this site's drift
            got = reply.content[Rec.ARRAYS]
            self.site_controls[str(reply.content[Rec.SITE][Site.NAME])] = {
                k: (x - got[k].numpy().astype(np.float64)) / (steps * self._lr) - applied[k]
                for k, x in self._sent.items()
            }
        if self.site_controls:
            mean = {k: np.mean([c[k] for c in self.site_controls.values()], axis=0) for k in self.control}
            self.control = mean
        return arrays, metrics

    def state(self) -> dict:
        """What a resumed study needs (server.coordinator.strategy_state)."""
        return {"control": self.control, "site_controls": self.site_controls}
