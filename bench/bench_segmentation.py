"""Does federating pay off for segmentation? Per-site and pooled Dice of the federated UNet against
each site alone and all sites pooled (centralized), on fedward's synthetic segmentation sites
(configs/demo-seg.yaml: three hospitals, different scanners), without and with DP-SGD at epsilon 8.

    python bench/bench_segmentation.py [--rounds 6] [--seeds 1]

Federated: `fedward simulate` (Flower's simulation engine). Local and centralized: the study's own
in-process references (server.study.references.train_alone: the same recipe, round for round, and
under privacy the noise a site derives for the same budget). Every model is tested on each site's
own test images with common.seg_metrics (MONAI's DiceMetric); pooled Dice adds the sites' sums.
Prints one table per privacy setting, medians over the seeds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from client.train import predict  # noqa: E402
from common.config import load_study  # noqa: E402
from common.data import load_site_data  # noqa: E402
from common.models import load_model  # noqa: E402
from common.seg_metrics import segmentation_summary, segmentation_sums  # noqa: E402
from common.simulated import simulated_sites  # noqa: E402
from server.run_folder import FINAL_MODEL_FILE  # noqa: E402
from server.simulate import simulate  # noqa: E402
from server.study.references import train_alone  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo-seg.yaml"


def dice_at_sites(model, data: dict) -> dict[str, dict]:
    """Each site's sums of the model's Dice on its test images, and the pooled Dice."""
    sums = {name: segmentation_sums(d.test_y.numpy(), predict(model, d.test_x).argmax(axis=1), d.num_classes)
            for name, d in data.items()}  # fmt: skip
    out = {name: segmentation_summary(s)["dice"] for name, s in sums.items()}
    total = {k: sum(s[k] for s in sums.values()) for k in next(iter(sums.values()))}
    return out | {"pooled": segmentation_summary(total)["dice"]}


def one_seed(study, seed: int, private: bool, folder: Path) -> dict[str, dict]:
    study = replace(study, seed=seed, privacy=replace(study.privacy, enabled=private, target_epsilon=8.0))
    data = {s.site: load_site_data(s) for s in simulated_sites(study)}
    runs = {}
    out = folder / f"fed-{seed}-{private}"
    simulate(study, out)
    runs["federated"] = dice_at_sites(load_model(out / FINAL_MODEL_FILE)[0], data)
    local = {}
    for name, d in data.items():
        model, _ = train_alone(study, d.train_x, d.train_y, in_channels=d.in_channels, num_classes=d.num_classes,
                               private=private, report_delta=study.privacy.delta)  # fmt: skip
        local[name] = dice_at_sites(model, {name: d})[name]
    runs["each site alone"] = local | {"pooled": None}
    x = torch.cat([d.train_x for d in data.values()])
    y = torch.cat([d.train_y for d in data.values()])
    central, _ = train_alone(
        study, x, y, in_channels=1, num_classes=2, private=private, report_delta=study.privacy.delta
    )
    runs["centralized"] = dice_at_sites(central, data)
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=1)
    args = parser.parse_args()
    study = replace(load_study(CONFIG), rounds=args.rounds)
    folder = Path(tempfile.mkdtemp(prefix="fedward-bench-seg-"))
    for private in (False, True):
        per_seed = [one_seed(study, seed, private, folder) for seed in range(args.seeds)]
        sites = list(per_seed[0]["federated"])
        print(f"\n== Dice, {'DP-SGD at epsilon 8 per site' if private else 'no privacy'}; {args.rounds} rounds, "
              f"median of {args.seeds} seed(s)")  # fmt: skip
        print(f"  {'model':<16}" + "".join(f"{s:>12}" for s in sites))
        for kind in per_seed[0]:
            cells = []
            for s in sites:
                values = [r[kind].get(s) for r in per_seed if r[kind].get(s) is not None]
                cells.append(f"{statistics.median(values):>12.3f}" if values else f"{'-':>12}")
            print(f"  {kind:<16}" + "".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
