"""The hospital site as a Flower ClientApp: handlers that only turn Messages into plain values and back.

The work is done by `client.site.SiteRuntime` (flwr-free). Which site this node is comes from the node's
own config: `site-config` (path to the site's YAML) in deployment. In simulation the engine only gives
each node a `partition-id`; the site is then the partition-id-th site of the study (from `fedward
simulate`, or from the run config's study file under `flwr run .`).

Run it through `fedward simulate`, `flwr run .`, or a SuperNode (`flower-supernode ... --node-config
"site-config='/etc/fedward/site.yaml'"`).
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.site import SiteReply, SiteRuntime, runtime_for
from common.config import load_site
from common.keys import Rec, Site
from common.schema import SiteConfig


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
    if sites is None:  # simulation through `flwr run .`: the study comes with the run config
        from common.runconfig import study_from_run_config
        from common.simulated import simulated_sites

        sites = simulated_sites(study_from_run_config(context.run_config))
    return sites[pid]


def to_message(msg: Message, reply: SiteReply) -> Message:
    """A site's reply as the Message Flower sends back."""
    records: dict = {
        Rec.METRICS: MetricRecord(dict(reply.metrics)),
        Rec.SITE: ConfigRecord({Site.NAME: reply.site, Site.REFUSED: reply.refused}),
    }
    if reply.weights is not None:
        records[Rec.ARRAYS] = ArrayRecord(reply.weights)
    return Message(RecordDict(records), reply_to=msg)


def handle_train(msg: Message, rt: SiteRuntime) -> Message:
    weights = msg.content[Rec.ARRAYS].to_torch_state_dict()
    return to_message(msg, rt.train(dict(msg.content[Rec.CONFIG]), weights))


def handle_evaluate(msg: Message, rt: SiteRuntime) -> Message:
    weights = msg.content[Rec.ARRAYS].to_torch_state_dict()
    return to_message(msg, rt.evaluate(dict(msg.content[Rec.CONFIG]), weights))


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
