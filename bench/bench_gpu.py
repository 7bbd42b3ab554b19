"""Per-round time of the PneumoniaMNIST study's site work on a GPU beside the same machine's CPU.

    python bench/bench_gpu.py --data-dir ../shared/data [--rounds 3] [--dp]

For each device it runs R FedAvg rounds of the shipped study (configs/pneumoniamnist.yaml, or
pneumoniamnist-dp.yaml with --dp): every site loads the global weights, trains with the same
function the ClientApp calls (client.train.train_epochs, Opacus DP-SGD with --dp), the weights are
averaged by number of examples, and every site evaluates the new global model. Flower itself is not
in the loop here (its Ray backend cannot be carried to the lent GPU machines): this measures what a
site's GPU changes, the part of a round that dominates it (see bench_fedavg.py for Flower's share).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client.dp import make_private  # noqa: E402
from client.train import make_optimizer, predict, train_epochs, train_loader  # noqa: E402
from common.config import load_study  # noqa: E402
from common.data import load_site_data  # noqa: E402
from common.metrics import pooled_summary, site_summary  # noqa: E402
from common.models import build_model  # noqa: E402
from common.privacy import derive_noise_multiplier  # noqa: E402
from common.simulated import simulated_sites  # noqa: E402


def run_rounds(study, sites, device: torch.device, rounds: int) -> tuple[list[float], float]:
    global_model = build_model(study.model.name, num_classes=2, seed=study.seed).to(device)
    times = []
    for rnd in range(1, rounds + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        states, weights = [], []
        for i, data in enumerate(sites):
            model = build_model(study.model.name, num_classes=2).to(device)
            model.load_state_dict(global_model.state_dict())
            loader = train_loader(data.train_x, data.train_y, study.train.batch_size, seed=rnd * 100 + i)
            opt = make_optimizer(
                model, study.train.optimizer, study.train.lr * study.train.lr_decay ** (rnd - 1)
            )
            criterion, private = torch.nn.CrossEntropyLoss(), study.privacy.enabled
            if private:
                q = 1 / len(loader)
                noise = derive_noise_multiplier(
                    target_epsilon=study.privacy.target_epsilon,
                    delta=study.privacy.delta,
                    sample_rate=q,
                    steps_total=study.rounds * study.train.local_epochs * len(loader),
                )
                dp = make_private(
                    model=model.train(),
                    optimizer=opt,
                    data_loader=loader,
                    criterion=criterion,
                    noise_multiplier=noise,
                    max_grad_norm=study.privacy.max_grad_norm,
                    grad_sample_mode=study.privacy.grad_sample_mode,
                )
                model, loader, opt, criterion = dp.model, dp.data_loader, dp.optimizer, dp.criterion
            train_epochs(
                model,
                loader,
                opt,
                criterion=criterion,
                epochs=study.train.local_epochs,
                use_augment=study.train.augment,
                seed=rnd,
                private=private,
            )
            if private:
                model = dp.unwrap()
            states.append({k: v.detach() for k, v in model.state_dict().items()})
            weights.append(len(data.train_y))
        total = sum(weights)
        global_model.load_state_dict(
            {k: sum(s[k] * (w / total) for s, w in zip(states, weights, strict=True)) for k in states[0]}
        )
        summaries = [site_summary(d.test_y.numpy(), predict(global_model, d.test_x)) for d in sites]
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        print(
            f"  {device.type} round {rnd}: {times[-1]:.2f} s, pooled AUC {pooled_summary(summaries)['auc']:.4f}",
            flush=True,
        )
    return times, pooled_summary(summaries)["auc"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("FEDWARD_DATA", "../shared/data"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dp", action="store_true", help="the DP study (configs/pneumoniamnist-dp.yaml)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    config = "configs/pneumoniamnist-dp.yaml" if args.dp else "configs/pneumoniamnist.yaml"
    study = load_study(Path(__file__).resolve().parents[1] / config, data_dir=args.data_dir)
    sites = [load_site_data(s) for s in simulated_sites(study)]
    devices = [torch.device("cuda")] if torch.cuda.is_available() else []
    devices.append(torch.device("cpu"))
    medians = {}
    for dev in devices:
        times, auc = run_rounds(study, sites, dev, args.rounds)
        medians[dev.type] = statistics.median(times[1:] or times)
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    print(
        f"\n== {study.name}: median round time after round 1 ({args.rounds} rounds, {len(sites)} sites; "
        f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} threads; GPU: {name})"
    )
    for dev, med in medians.items():
        print(f"  {dev:<5} {med:8.2f} s")
    if "cuda" in medians:
        print(f"  CPU / GPU: {medians['cpu'] / medians['cuda']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
