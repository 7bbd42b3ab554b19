"""A Grid of our own for the coordinator's round loop: its nodes answer in this process (the
ClientApp's real handlers on small synthetic sites, or whatever a test makes them do), without Ray or
a SuperLink. Messages need Flower's TaskIdentity set (tests set it in a fixture)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable

from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from client.app import handle_evaluate, handle_train
from client.site import SiteRuntime
from common.schema import (
    EvaluationPolicyConfig,
    SiteConfig,
    SiteDataConfig,
    SitePartition,
    SitePolicyConfig,
    SyntheticConfig,
)

Behaviour = Callable[[Message], Message | None]  # None: the site stays silent


class LocalGrid(Grid):
    """A Grid whose nodes answer in this process; message ids as Flower's InMemoryGrid sets them."""

    def __init__(self, nodes: dict[int, Behaviour]):
        self.nodes = nodes
        self.asked: list[tuple[str, int]] = []  # (message type, node) of every message sent
        self.waiting: list[Message] = []  # replies not pulled yet

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self.asked.append((msg.metadata.message_type, msg.metadata.dst_node_id))
            reply = self.nodes[msg.metadata.dst_node_id](msg)
            if reply is not None:
                self.waiting.append(reply)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        wanted = set(message_ids)
        out = [m for m in self.waiting if m.metadata.reply_to_message_id in wanted]
        self.waiting = [m for m in self.waiting if m not in out]
        return out

    # the rest of Grid's interface is not used by the coordinator
    def set_run(self, run_id: int) -> None: ...
    def run(self): ...
    def create_message(self, *args, **kwargs): ...
    def send_and_receive(self, messages, *, timeout=None): ...


def honest(
    name: str, index: int, state_dir: str = "", repeatable_noise: bool = False, train_per_site: int = 32
) -> Behaviour:
    data = SiteDataConfig(
        format="synthetic",
        partition=SitePartition(index=index, num_sites=3),
        synthetic=SyntheticConfig(train_per_site=train_per_site, test_per_site=16),
    )
    # as a simulated site: it follows the study's privacy setting, releases exact evaluation aggregates
    policy = SitePolicyConfig(
        required=False, evaluation=EvaluationPolicyConfig(release="exact"), repeatable_noise=repeatable_noise
    )
    runtime = SiteRuntime.load(SiteConfig(site=name, data=data, privacy=policy, state_dir=state_dir))

    def answer(msg: Message) -> Message:
        if msg.metadata.message_type == MessageType.TRAIN:
            return handle_train(msg, runtime)
        return handle_evaluate(msg, runtime)

    return answer
