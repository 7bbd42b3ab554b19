"""SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning",
ICML 2020) as a Flower strategy whose control variates never leave the coordinator.

Each site i has a control variate c_i (its average local step direction), the federation c (their
mean over all sites). Every round a site gets the global model x and its correction c - c_i
(common.keys.CORRECTION_PREFIX keys; client.drift applies it after every local step, so it never
enters DP-SGD's clipped, noised gradient). From the update y_i it sends back, as it always does, and
the number of steps K_i it took at the round's learning rate lr, SCAFFOLD's second option gives

    c_i+ = c_i - c + (x - y_i) / (K_i lr)        c+ = c + (1/N) sum over the round's sites (c_i+ - c_i)

which with plain SGD is the mean of the site's gradients over its steps, and with Adam the mean of
its steps' directions. Everything is computed here from what the sites already send: SCAFFOLD adds
nothing to a site's release, private or not. The global model is FedAvg's weighted average.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.keys import CORRECTION_PREFIX, Cfg, Met, Rec


class Scaffold(FedAvg):
    """FedAvg with SCAFFOLD's drift correction over `parameters` (the model's trainable weights) and
    `num_sites` sites (N above)."""

    def __init__(self, *, parameters: list[str], num_sites: int, **fedavg):
        super().__init__(**fedavg)
        self.parameters, self.num_sites = list(parameters), int(num_sites)
        self.control: dict[str, np.ndarray] = {}  # c
        self.site_controls: dict[int, dict[str, np.ndarray]] = {}  # c_i by node id
        self._sent: dict[str, np.ndarray] = {}  # x: this round's global weights
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

    def _with_correction(self, message: Message, arrays: ArrayRecord, config: ConfigRecord) -> Message:
        node = message.metadata.dst_node_id
        mine = self.site_controls.get(node)
        correction = {
            CORRECTION_PREFIX + k: Array((c - mine[k] if mine else c).astype(arrays[k].numpy().dtype))
            for k, c in self.control.items()
        }
        content = RecordDict(
            {Rec.ARRAYS: ArrayRecord({**dict(arrays.items()), **correction}), Rec.CONFIG: config}
        )
        return Message(content=content, message_type=message.metadata.message_type, dst_node_id=node)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        change = {k: np.zeros_like(v) for k, v in self.control.items()}
        for reply in replies:
            steps = int(reply.content[Rec.METRICS].get(Met.STEPS, 0))
            if steps <= 0 or self._lr <= 0:
                continue  # no steps taken: nothing learned about this site's drift
            node = reply.metadata.src_node_id
            old = self.site_controls.get(node) or {k: np.zeros_like(v) for k, v in self.control.items()}
            got = reply.content[Rec.ARRAYS]
            new = {
                k: old[k] - self.control[k] + (x - got[k].numpy().astype(np.float64)) / (steps * self._lr)
                for k, x in self._sent.items()
            }
            for k in change:
                change[k] += new[k] - old[k]
            self.site_controls[node] = new
        for k in self.control:
            self.control[k] = self.control[k] + change[k] / self.num_sites
        return arrays, metrics

    def state(self) -> dict:
        """What a resumed study needs (server.coordinator.strategy_state)."""
        return {"control": self.control, "site_controls": self.site_controls}
