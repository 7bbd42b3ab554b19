"""A study's personalized models: each site gets the model that is best for it.

- `fedbn`: a federation with `strategy.local_norm` (client.local_norm): the shared layers federated,
  each site's normalization parameters its own. Site s's model is the final global model with s's
  own normalization parameters, read from where s kept them (its state folder in the run).
- `fine-tuned`: the primary federated model trained on at each site for `study.fine_tune_epochs`
  epochs, through the site's own path (client.site.SiteRuntime: policy, guard, ledger) as the round
  after the federation's last, so under privacy it is charged to the site's ledger beside the
  federation's rounds (the site refuses past its budget).
- `best_for_site`: per site, the candidate (trained alone, federated, fedbn, fine-tuned) with the best
  headline metric on the site's *validation* images, ties broken by the lower validation cross-entropy
  (classification); the test metric is reported, never used to choose. `chosen_pooled`: all test
  data together, each site's scored by the model chosen for it (what the hospitals deploy).

The functions take the running study (server.study.run.ComparisonRun).
"""

from __future__ import annotations

import copy

from client.local_norm import load_local
from server.run_folder import LOCAL_OF, Variant, model_key
from server.study.plan import Part, with_privacy
from server.study.site_ledgers import train_at_site


def fedbn_models(run, part: Part) -> None:
    """The FedBN-style federation, then one model per site: the global model with its own norms."""
    study = with_privacy(run.study, part.private)
    study.strategy.local_norm = True
    results, model = run._federate(study, run.out / part.key, None)
    sites = {s.site: s for s in run.site_configs(study, run.out / part.key)}
    for name in run.data:
        own = load_local(sites[name].state_dir, results["study_id"])
        mine = copy.deepcopy(model)
        mine.load_state_dict({**model.state_dict(), **(own or {})})
        key = model_key(Variant.FEDBN, name)
        run.trained[key] = mine
        run.evaluator.predict(key, mine)
        run.models[key] = {"kind": "personalized", "site": name, "run_dir": part.key, "private": part.private,
                           "own_normalization": own is not None, "study_id": results["study_id"],
                           "epsilon": (results.get("final", {}).get("sites", {}).get(name) or {}).get("epsilon"),
                           "eval": run.evaluator.evaluate(key, roc_on={name})}  # fmt: skip


def fine_tune(run, part: Part, name: str) -> None:
    """The primary federated model trained on at site `name` (see the module docstring)."""
    primary = run.doc["primary"]
    start = copy.deepcopy(run.trained[primary])
    study = with_privacy(run.study, part.private)
    site = {s.site: s for s in run.site_configs(study, run.out / primary)}[name]
    study_id = run.models[primary]["results"]["study_id"]
    after = study.rounds + 1
    model, info = train_at_site(study, site, run.data[name], private=part.private, start=start, study_id=study_id,
                                rounds=range(after, after + 1), local_epochs=run.study.study.fine_tune_epochs)  # fmt: skip
    key = model_key(Variant.FINE_TUNED, name)
    run.trained[key] = model
    run.evaluator.predict(key, model)
    run.models[key] = {"kind": "personalized", "site": name, "from": primary, **info,
                       "epochs": run.study.study.fine_tune_epochs, "eval": run.evaluator.evaluate(key, roc_on={name})}  # fmt: skip
    if info.get("refused"):
        run.progress.site_done(name, f"fine-tuning refused: {info['refused']}")


def best_for_site(run) -> dict:
    """Per site: every candidate's validation metric, the one chosen, and its test metric."""
    primary, metric = run.doc["primary"], run.evaluator.metric
    out = {}
    for name in run.data:
        candidates = [model_key(LOCAL_OF[primary], name), primary,
                      model_key(Variant.FEDBN, name), model_key(Variant.FINE_TUNED, name)]  # fmt: skip
        scored = {
            k: run.evaluator.validation_score(run.trained[k], name) for k in candidates if k in run.trained
        }
        scored = {k: (round(v[0], 6), v[1]) for k, v in scored.items() if v is not None and v[0] is not None}
        if not scored:
            continue
        # the best metric; among equal metrics the lowest cross-entropy (segmentation: the first candidate)
        best = max(scored, key=lambda k: (scored[k][0], -(scored[k][1] or 0.0)))
        out[name] = {"model": best, "validation": {k: v[0] for k, v in scored.items()},
                     "test": run.models[best]["eval"][name].get(metric)}  # fmt: skip
        if any(loss is not None for _, loss in scored.values()):
            out[name]["validation_cross_entropy"] = {k: round(v[1], 6) for k, v in scored.items()}
    return out


def chosen_pooled(run, best: dict) -> dict | None:
    """All test data together, each site's scored by the model `best_for_site` chose for it: the
    headline metric with its interval (and the pooled AUC's parts); None unless every site has one."""
    if set(best) != set(run.data):
        return None
    keys = {name: best[name]["model"] for name in run.data}
    return {"models": keys, **run.evaluator.pooled_of_own(keys)}
