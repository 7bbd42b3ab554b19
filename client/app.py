"""The hospital site as a Flower ClientApp: handlers that only turn Messages into plain values and back.

Where the work happens depends on the node:

- a deployed SuperNode gives `site-socket` in its node config: every message is forwarded to the
  hospital's own site service (`fedward site serve`, client.service) through client.forwarder. This
  process then never touches the site's data, ledger or policy; it does not even import torch.
- in simulation the engine gives a `partition-id`: the site is the partition-id-th site of the study
  (from `fedward simulate`, or from the run config's study file under `flwr run .`), run in this
  process by `client.site.SiteRuntime`.

A SuperNode that names neither is told how to start properly; one that gives its `site-config` to the
ClientApp (the way before the site service) is refused: the ClientApp is the coordinator's code, and
must not be handed the site's files.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.forwarder import SOCKET_KEY, forward
from common.keys import Rec, Site

SIMULATION_KEY = "partition-id"


class NodeConfigError(RuntimeError):
    """The SuperNode's node config does not say how this site is reached; the message says how."""


def to_message(msg: Message, reply) -> Message:
    """A site's reply (client.site.SiteReply) as the Message Flower sends back."""
    records: dict = {
        Rec.METRICS: MetricRecord(dict(reply.metrics)),
        Rec.SITE: ConfigRecord(
            {
                Site.NAME: reply.site,
                Site.REFUSED: reply.refused,
                Site.RELEASE: reply.release,
                Site.INPUT: reply.input,
            }
        ),
    }
    if reply.weights is not None:
        records[Rec.ARRAYS] = ArrayRecord(reply.weights)
    return Message(RecordDict(records), reply_to=msg)


def handle_train(msg: Message, rt) -> Message:
    """Train in this process with `rt` (a client.site.SiteRuntime)."""
    weights = msg.content[Rec.ARRAYS].to_torch_state_dict()
    return to_message(msg, rt.train(dict(msg.content[Rec.CONFIG]), weights))


def handle_evaluate(msg: Message, rt) -> Message:
    """Evaluate in this process with `rt` (a client.site.SiteRuntime)."""
    weights = msg.content[Rec.ARRAYS].to_torch_state_dict()
    return to_message(msg, rt.evaluate(dict(msg.content[Rec.CONFIG]), weights))


def simulated_runtime(context: Context, sites: list | None = None):
    """The runtime of this simulated node: the partition-id-th site of the study."""
    from client.site import runtime_for  # late: torch and the site's data code, simulation only

    pid = int(context.node_config[SIMULATION_KEY])
    if sites is None:  # simulation through `flwr run .`: the study comes with the run config
        from common.runconfig import study_from_run_config
        from common.simulated import simulated_sites

        sites = simulated_sites(study_from_run_config(context.run_config))
    return runtime_for(sites[pid])


def _route(msg: Message, context: Context, sites: list | None, op: str) -> Message:
    node = context.node_config
    if SOCKET_KEY in node:
        return forward(msg, str(node[SOCKET_KEY]), op)
    if SIMULATION_KEY in node:
        runtime = simulated_runtime(context, sites)
        return handle_train(msg, runtime) if op == "train" else handle_evaluate(msg, runtime)
    if "site-config" in node:
        raise NodeConfigError(
            "this SuperNode hands its site config to the ClientApp, which is the coordinator's code; run "
            "the site service (`fedward site serve SITE_CONFIG`) and start the SuperNode with "
            f"--node-config \"{SOCKET_KEY}='/path/to/site.sock'\" instead"
        )
    raise NodeConfigError(
        f"this SuperNode does not say where its site service listens: start it with --node-config "
        f"\"{SOCKET_KEY}='/path/to/site.sock'\" (the socket of `fedward site serve SITE_CONFIG`)"
    )


def make_client_app(sites: list | None = None) -> ClientApp:
    """A ClientApp; `sites` (SiteConfigs in partition order) is given by `fedward simulate`."""
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return _route(msg, context, sites, "train")

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return _route(msg, context, sites, "evaluate")

    return client_app


app = make_client_app()
