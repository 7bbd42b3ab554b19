"""Sorting the sites' replies to a round: usable updates, refusals, failures, silences.

`classify` looks at every reply the coordinator got for the messages it sent: a site that sent nothing
back in time failed ("no reply within round_timeout_s"), a reply with an error failed with the error's
useful end, a refusal is kept with the site's reason, and an update is used only when `check_update`
finds it sound (the global model's keys and shapes, finite values). Site identity comes from each
reply's `site` record; a node that never said its name is `node-<id>`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message

from common.keys import Met, Rec, Site
from common.privacy import reported

log = logging.getLogger("fedward.coordinator")


@dataclass
class Replies:
    ok: list[Message] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    privacy: dict[str, dict] = field(default_factory=dict)  # site -> epsilon, delta, noise, steps
    silent: set[int] = field(default_factory=set)  # nodes that did not answer within round_timeout_s
    inputs: dict[str, dict] = field(default_factory=dict)  # site -> how it prepares its images (Site.INPUT)


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


def classify(
    replies: list[Message],
    sent: list[Message],
    *,
    reference: ArrayRecord | None,
    node_site: dict[int, str],
    timeout_s: float,
) -> Replies:
    """Sort `replies` to `sent` into usable, refused and failed; updates are checked against
    `reference` (the global model; None for evaluation). `node_site` (node id -> site name) is
    updated from the replies and names the nodes that stayed silent."""
    out = Replies()
    dst = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
    answered = {m.metadata.reply_to_message_id for m in replies}
    for node in sorted(dst[i] for i in dst.keys() - answered):  # e.g. a killed SuperNode
        name = node_site.get(node, f"node-{node}")
        out.silent.add(node)
        out.failed[name] = f"no reply within round_timeout_s={timeout_s:g}s"
        log.warning("site %s: %s", name, out.failed[name])
    for msg in replies:
        node = dst.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
        if msg.has_error():
            name = node_site.get(node, f"node-{node}")
            out.failed[name] = short_reason(msg.error.reason)
            log.warning("site %s failed: %s", name, msg.error.reason)
            continue
        name = node_site[node] = site_name(msg)
        _sort_reply(msg, name, reference, out)
    return out


def _sort_reply(msg: Message, name: str, reference: ArrayRecord | None, out: Replies) -> None:
    metrics = msg.content.metric_records.get(Rec.METRICS)
    if metrics is not None and Met.EPSILON in metrics:
        out.privacy[name] = {
            "epsilon": reported(float(metrics[Met.EPSILON])),
            "delta": float(metrics[Met.DELTA]),
            "noise_multiplier": float(metrics.get(Met.NOISE_MULTIPLIER, 0.0)) or None,
            "steps": int(metrics[Met.STEPS]),
            "repeatable_noise": bool(metrics.get(Met.REPEATABLE_NOISE, 0)),
            "privacy_unit": (
                ("patient" if metrics[Met.PRIVACY_UNIT] else "image") if Met.PRIVACY_UNIT in metrics else None
            ),
        }
    refused = str(msg.content[Rec.SITE].get(Site.REFUSED, ""))
    if refused:
        out.refused[name] = refused
        log.warning("site %s refused: %s", name, refused)
        return
    described = str(msg.content[Rec.SITE].get(Site.INPUT, ""))
    if described:
        try:
            out.inputs[name] = dict(json.loads(described))
        except (ValueError, TypeError):
            log.warning("site %s: its input description is not a JSON object; left out of the package", name)
    if reference is not None:
        problem = check_update(msg.content.array_records.get(Rec.ARRAYS), reference)
        if problem:
            out.failed[name] = f"update rejected: {problem}"
            log.warning("site %s: update rejected: %s", name, problem)
            return
    out.ok.append(msg)
