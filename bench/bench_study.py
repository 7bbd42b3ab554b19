"""Federated against local-only, federated with privacy and centralized, per site, in one run.

    python bench/bench_study.py --data-dir ../shared/data [--seeds 3] [--rounds N] [--datasets ...]

For each data set (configs/<name>.yaml as shipped, with 3 sites, label skew and acquisition shift on:
each site's images as if from its own scanner), runs `fedward study` with privacy compared (the DP
runs at target epsilon 8 per site), once per training seed (--seeds, on the same split: per-site
test sets are small, so one seed's AUC differences are mostly noise), and prints the median over seeds
of the test AUC of every model on every site's test data and on all test data pooled: each site's
local-only model, the federated model, the federated model with privacy (and its largest site
epsilon) and the centralized model. Then the targets, measured on
those medians (and how many seeds meet each alone):

  1. the federated model beats every local-only model on every site's test data
  2. pooled, the federated model is within 1 AUC point of centralized
  3. the worst site under federation is within 3 AUC points of the pooled AUC

With `--personalize`, also each site's best federated variant on its own test data against the best
local-only model, and all test data together with each site's scored by its own model of each family
(and by the model chosen for it on validation) against centralized: "the best federated variant within
1 AUC point of centralized pooled". Every model's pooled AUC is also split by its pairs: those within a
site and those across two (common.metrics.pooled_auc_parts).

`--leave-one-out` adds the leave-one-site-out federations (3 more runs per data set); `--personalize`
the FedBN-style and fine-tuned models; `--without-privacy` leaves out the DP runs (the federated and
local-only models with privacy: half the training); `--strategies fedprox fedadam` one more federation per strategy
and seed, compared with fedavg on every site's test data (`fedavg-sites`: FedAvg with each site
weighed once, `strategy.weighting: sites`). Each study's
folder (study.json, report.html) is kept under --out (OUT/<dataset>/seed-<k>), a temporary folder by
default; a completed study found there is reused, so a run cut short can be continued (one of another
config is refused, not overwritten). `--set train.local_epochs=1 rounds=50` changes the configs' keys
for every model the run trains.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402
from rich.console import Console  # noqa: E402

from common.config import load_study, with_changes  # noqa: E402
from server.run_folder import STUDY_FILE, Variant, model_key, split_key  # noqa: E402
from server.study.run import run_comparison  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FED = str(Variant.FEDERATED)


def local(site: str) -> str:
    return model_key(Variant.LOCAL, site)


def study_for(dataset: str, args: argparse.Namespace, seed: int):
    """The data set's shipped study as the benchmark runs it, with training seed `seed` on the one split."""
    study = load_study(
        ROOT / "configs" / f"{dataset}.yaml", rounds=args.rounds, num_sites=3, data_dir=args.data_dir
    )
    study.data.partition.scheme = "label_skew"
    study.data.partition.acquisition_shift = True
    study.seed, study.data.partition.seed = seed, 0  # same sites and split, another training seed
    # every site's test data holds >= 10 images of each class, so its AUC (and the comparison of
    # models on it) measures something; the first Dirichlet draw for seed 0 leaves a site 4 positives
    study.data.partition.min_test_per_class = 10
    study.privacy.enabled = False  # the study as configured; compare_privacy adds the DP runs
    study.privacy.target_epsilon = 8.0
    study.study.compare_privacy = not args.without_privacy
    study.study.local = study.study.centralized = not args.without_baselines
    study.study.leave_one_out = args.leave_one_out
    if args.personalize:  # issue 16: FedBN-style federation and fine-tuning at each site
        study.study.fedbn = True
        study.study.fine_tune_epochs = args.fine_tune_epochs or study.train.local_epochs
    return with_changes(study, dict(args.set))


def _auc(doc: dict, key: str, test_set: str) -> float | None:
    return doc["models"][key]["eval"].get(test_set, {}).get("auc")


def _targets(doc: dict) -> list[tuple[str, bool, str]]:
    """The issue's targets, measured on one study."""
    sites = doc["sites"]
    fed = {t: _auc(doc, FED, t) for t in [*sites, "pooled"]}
    worst = min(sites, key=lambda t: fed[t])
    targets = []
    if all(local(x) in doc["models"] for x in sites):  # not with --without-baselines
        margins = [fed[t] - _auc(doc, local(x), t) for t in sites for x in sites]
        targets.append((
            "federated beats every local-only model on every site's test data",
            min(margins) > 0,
            f"smallest margin {min(margins) * 100:+.1f} points",
        ))  # fmt: skip
    if Variant.CENTRALIZED in doc["models"]:
        central = _auc(doc, Variant.CENTRALIZED, "pooled")
        targets.append((
            "pooled: federated within 1 AUC point of centralized",
            fed["pooled"] >= central - 0.01,
            f"{fed['pooled']:.4f} vs {central:.4f} ({(fed['pooled'] - central) * 100:+.1f} points)",
        ))  # fmt: skip
    targets += [
        (
            "worst site under federation within 3 points of the pooled AUC",
            fed[worst] >= fed["pooled"] - 0.03,
            f"{worst} {fed[worst]:.4f} vs pooled {fed['pooled']:.4f} ({(fed[worst] - fed['pooled']) * 100:+.1f} points)",
        ),
    ]
    if Variant.FEDERATED_DP in doc["models"]:  # not with --without-privacy
        eps = max(e for e in doc["models"][Variant.FEDERATED_DP]["epsilon"].values() if e is not None)
        targets.append(("DP runs within epsilon 8 per site", eps <= 8.0 + 1e-6, f"largest {eps:.2f}"))
    return targets


def _personalized(docs: list[dict], sites: list[str]) -> bool | None:
    """Each site's own test data: the best federated variant (federated, its FedBN model, its fine-tuned
    model) against the best local-only model, medians over the seeds; and each site's validation choice.
    Then all test data together (`_personalized_pooled`, whose target it returns)."""
    print("  personalized, on each site's own test data (median over seeds):")
    for t in sites:
        values = {}
        for key in (
            FED,
            model_key(Variant.FEDBN, t),
            model_key(Variant.FINE_TUNED, t),
            *(local(x) for x in sites),
        ):
            values[key] = _median([_auc(d, key, t) for d in docs if key in d["models"]])
        fed = max(v for k, v in values.items() if split_key(k)[0] != Variant.LOCAL and v is not None)
        alone = max(
            (v for k, v in values.items() if split_key(k)[0] == Variant.LOCAL and v is not None), default=None
        )
        chosen = [d["best_for_site"][t]["model"] for d in docs if t in d.get("best_for_site", {})]
        cells = "  ".join(
            f"{split_key(k)[0]} {v:.4f}"
            for k, v in values.items()
            if v is not None and split_key(k)[0] != Variant.LOCAL
        )
        versus = (
            "no local-only models in this run (--without-baselines)"
            if alone is None
            else f"best local-only {alone:.4f}  -> best federated variant "
            f"{'beats' if fed > alone else 'does NOT beat'} it ({(fed - alone) * 100:+.1f} points)"
        )
        print(f"    {t:<12} {cells}  {versus}; chosen on validation: {', '.join(chosen)}")  # fmt: skip
    return _personalized_pooled(docs)


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _pooled_cell(doc: dict, column: str) -> dict:
    """The comparison's pooled cell: a federated or centralized model on all test data, or a per-site
    family with each site's test data scored by its own model."""
    return doc["comparison"]["rows"]["pooled"].get(column, {})


def _personalized_pooled(docs: list[dict]) -> bool | None:
    """All test data together, each site's scored by its own model of each personalized family and by
    the model chosen for it on validation, against centralized (medians over the seeds); prints the
    target "the best federated variant within 1 AUC point of centralized pooled" (None: no centralized)."""
    values = {
        "federated": [_pooled_cell(d, FED).get("auc") for d in docs],
        "fedbn (each site its own)": [_pooled_cell(d, Variant.FEDBN).get("auc") for d in docs],
        "fine-tuned (each site its own)": [_pooled_cell(d, Variant.FINE_TUNED).get("auc") for d in docs],
        "chosen on validation (each site its own)": [(d.get("chosen_pooled") or {}).get("auc") for d in docs],
    }
    medians = {k: m for k, v in values.items() if (m := _median(v)) is not None}
    central = _median([_pooled_cell(d, Variant.CENTRALIZED).get("auc") for d in docs])
    print("  pooled, each site's test data scored by its own model (median over seeds):")
    for label, m in medians.items():
        print(f"    {label:<42} {m:.4f}")
    if central is None:
        return None
    best = max(medians, key=medians.get)
    ok = medians[best] >= central - 0.01
    print(
        f"  [{'met' if ok else 'MISSED'}] pooled: the best federated variant within 1 AUC point of centralized: "
        f"{best} {medians[best]:.4f} vs {central:.4f} ({(medians[best] - central) * 100:+.1f} points)"
    )
    return ok


def _pair_parts(docs: list[dict]) -> None:
    """Where the pooled AUCs differ: the pairs of one site's images, and those of two sites'."""
    rows = {FED: "federated", str(Variant.CENTRALIZED): "centralized",
            str(Variant.FINE_TUNED): "fine-tuned (each site its own)"}  # fmt: skip
    printed = False
    for column, label in rows.items():
        parts = [_pooled_cell(d, column).get("auc_parts") for d in docs]
        parts = [p for p in parts if p]
        if not parts:
            continue
        if not printed:
            share = statistics.median(p["across_share"] for p in parts)
            print(
                f"  pooled AUC by its pairs (median over seeds; {share * 100:.0f}% of the pairs join two sites):"
            )
            printed = True
        within = statistics.median(p["within_sites"] for p in parts)
        across = statistics.median(p["across_sites"] for p in parts)
        print(f"    {label:<32} within a site {within:.4f}  across sites {across:.4f}")


def _intervals(docs: list[dict], test_sets: list[str]) -> None:
    """Each seed's federated AUC with its 95% bootstrap interval on every test set."""
    for d in docs:
        cis = [
            f"{t} [{ci[0]:.3f}, {ci[1]:.3f}]"
            for t in test_sets
            if (ci := d["models"][FED]["eval"].get(t, {}).get("ci", {}).get("auc"))
        ]
        print(f"  seed {d['study']['seed']}: federated AUC, 95% bootstrap intervals: {'; '.join(cis)}")


def report(dataset: str, docs: list[dict], wall: float) -> bool:
    """Print the median over seeds of every model's AUC on every test set, then the targets: measured
    on the medians, and how many seeds meet each on their own."""
    doc = docs[0]
    s = doc["study"]
    sites = doc["sites"]
    test_sets = [*sites, "pooled"]
    columns = [(local(x), f"{x} alone") for x in sites]
    columns += [
        (FED, "federated"),
        (str(Variant.FEDERATED_DP), "fed. DP"),
        (str(Variant.CENTRALIZED), "centralized"),
    ]
    columns = [(key, label) for key, label in columns if key in doc["models"]]  # no DP: --without-privacy
    seeds = [d["study"]["seed"] for d in docs]
    print(
        f"\n== {dataset}: {len(sites)} sites, label skew alpha {s['data']['partition']['alpha']} + acquisition "
        f"shift, {s['rounds']} rounds x {s['train']['local_epochs']} local epochs, {s['model']['name']}; "
        f"DP target epsilon {s['privacy']['target_epsilon']:g}; training seeds {seeds} on one split; "
        f"{wall / 60:.1f} min"
    )
    if len(docs) > 1:
        print("  test AUC, median over the seeds:")
    width = max(14, *(len(label) + 2 for _, label in columns))
    print(f"  {'test data':<12}{'n':>6}" + "".join(f"{label:>{width}}" for _, label in columns))
    median_doc = {"sites": sites, "models": {}}
    for key, _ in columns:
        evals = {}
        for t in test_sets:
            values = [a for d in docs if (a := _auc(d, key, t)) is not None]
            evals[t] = {"auc": statistics.median(values)} if values else {}
        epsilon = {}
        if key == Variant.FEDERATED_DP:  # the largest epsilon any seed spent, per site
            for site in sites:
                spent = [e for d in docs if (e := d["models"][key]["epsilon"].get(site)) is not None]
                epsilon[site] = max(spent) if spent else None
        median_doc["models"][key] = {"eval": evals, "epsilon": epsilon}
    for t in test_sets:
        info = doc["site_info"]
        n = sum(i["n_test"] for i in info.values()) if t == "pooled" else info[t]["n_test"]
        cells = []
        for key, _ in columns:
            auc = median_doc["models"][key]["eval"][t].get("auc")
            cells.append(f"{'-' if auc is None else f'{auc:.4f}':>{width}}")
        print(f"  {t:<12}{n:>6}" + "".join(cells))
    _intervals(docs, test_sets)
    _pair_parts(docs)
    personal = None
    if "best_for_site" in doc and any(
        split_key(k)[0] in (Variant.FEDBN, Variant.FINE_TUNED) for k in doc["models"]
    ):
        personal = _personalized(docs, sites)
    per_seed = [_targets(d) for d in docs]
    for i, (text, ok, detail) in enumerate(_targets(median_doc)):
        met = sum(targets[i][1] for targets in per_seed)
        print(f"  [{'met' if ok else 'MISSED'}] {text}: {detail}  (met by {met} of {len(docs)} seeds alone)")
    return all(ok for _, ok, _ in _targets(median_doc)) and personal is not False


def study_in(study, folder: Path, console: Console) -> dict:
    """`fedward study` of `study` in `folder`, or the completed study already there."""
    done = folder / STUDY_FILE
    if done.exists() and (doc := json.loads(done.read_text())).get("status") == "completed":
        if changed := _differences(doc["study"], study.to_dict()):
            raise SystemExit(
                f"{folder} holds a completed study of another config ({', '.join(changed)} differ); "
                "give this run another --out (it is kept as it is)"
            )
        print(f"  reusing the completed study in {folder}", file=sys.stderr)
        return doc
    return run_comparison(study, folder, console=console)


def _differences(stored: dict, wanted: dict, where: str = "") -> list[str]:
    """The dotted keys whose values differ (the data folder and the config's own path aside)."""
    out = []
    for key in sorted(set(stored) | set(wanted)):
        dotted = f"{where}{key}"
        if dotted in ("source_path", "data.data_dir"):
            continue
        a, b = stored.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{dotted}.")
        elif json.dumps(a) != json.dumps(b):
            out.append(dotted)
    return out


def strategies(dataset: str, args: argparse.Namespace, docs: list[dict], out: Path, console: Console) -> None:
    """The federated model under each of `args.strategies`, same sites, splits and seeds as `docs`'s
    fedavg: test AUC per site and pooled, medians over the seeds, and the difference to fedavg."""
    sites = docs[0]["sites"]
    rows = {"fedavg": [{t: _auc(d, FED, t) for t in [*sites, "pooled"]} for d in docs]}
    for name in args.strategies:
        rows[name] = []
        for seed in range(args.seeds):
            study = study_for(dataset, args, seed)
            study.strategy.name, _, weighting = name.partition("-")  # "fedavg-sites": each site weighs once
            study.strategy.weighting = weighting or "examples"
            study.study.local = study.study.centralized = study.study.compare_privacy = False
            study.study.fedbn, study.study.fine_tune_epochs = False, 0
            doc = study_in(study, out / dataset / name / f"seed-{seed}", console)
            rows[name].append({t: _auc(doc, FED, t) for t in [*sites, "pooled"]})
    print(f"  strategies, federated model's test AUC (median over {args.seeds} seeds; difference to fedavg):")
    print(f"    {'strategy':<10}" + "".join(f"{t:>18}" for t in [*sites, "pooled"]))
    base = {t: statistics.median(r[t] for r in rows["fedavg"]) for t in [*sites, "pooled"]}
    for name, runs in rows.items():
        med = {t: statistics.median(r[t] for r in runs) for t in [*sites, "pooled"]}
        cells = "".join(f"{med[t]:>10.4f} ({(med[t] - base[t]) * 100:+.1f})" for t in [*sites, "pooled"])
        print(f"    {name:<10}{cells}")


def dotted_change(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: give KEY=VALUE, e.g. train.local_epochs=1")
    return key, yaml.safe_load(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("FEDWARD_DATA", "../shared/data"))
    parser.add_argument("--datasets", nargs="+", default=["pneumoniamnist", "breastmnist"])
    parser.add_argument("--rounds", type=int, help="override the configs' rounds (a quick check)")
    parser.add_argument(
        "--seeds", type=int, default=3, help="training seeds per data set (same split); medians are reported"
    )
    parser.add_argument(
        "--leave-one-out", action="store_true", help="also run the leave-one-site-out federations"
    )
    parser.add_argument(
        "--out", default="", help="keep each study in OUT/<dataset> (default: a temporary folder)"
    )
    parser.add_argument(
        "--personalize", action="store_true", help="add the FedBN-style and fine-tuned variants"
    )
    parser.add_argument(
        "--fine-tune-epochs", type=int, default=0,
        help="with --personalize: epochs of fine-tuning at each site (default: the config's local epochs)",
    )  # fmt: skip
    parser.add_argument(
        "--without-privacy", action="store_true",
        help="leave out the DP runs (federated and local-only), half of a study's training time",
    )  # fmt: skip
    parser.add_argument(
        "--without-baselines", action="store_true",
        help="leave out the local-only and centralized runs (their figures and the targets that need them); "
        "without privacy they are deterministic, so those of an earlier run of the same code stand",
    )  # fmt: skip
    parser.add_argument(
        "--strategies", nargs="*", default=[], choices=("fedprox", "fedadam", "fedavgm", "scaffold", "fedavg-sites"),
        help="also federate with these strategies (federated model only) beside the configs' fedavg",
    )  # fmt: skip
    parser.add_argument(
        "--set", nargs="*", default=[], type=dotted_change, metavar="KEY=VALUE",
        help="change the configs' keys (YAML values: train.local_epochs=1 rounds=50), for every model the "
        "run trains; use another --out than the unchanged run's, whose completed studies would be reused",
    )  # fmt: skip
    args = parser.parse_args()

    out = Path(args.out or tempfile.mkdtemp(prefix="fedward-bench-study-"))
    console = Console(stderr=True)  # progress to stderr; the figures to stdout
    met = {}
    for dataset in args.datasets:
        t0 = time.perf_counter()
        docs = []
        for seed in range(args.seeds):
            docs.append(study_in(study_for(dataset, args, seed), out / dataset / f"seed-{seed}", console))
        met[dataset] = report(dataset, docs, time.perf_counter() - t0)
        if args.strategies:
            strategies(dataset, args, docs, out, console)
        print(f"  reports: {out / dataset}/seed-*/report.html")
    print(
        "\nall targets met"
        if all(met.values())
        else f"\ntargets missed for: {[d for d, ok in met.items() if not ok]}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
