"""How much slower is a DP-SGD step than a plain one, per Opacus grad_sample_mode?

Times one optimizer step (forward, backward, clip + noise, update) of a model (`--model`: `cnn28` on
28x28 images, `cnn3d` on 16 x 28 x 28 volumes, `unet` segmenting 28x28 images with Dice + CE) on a
fixed batch, without DP and with DP in each mode, interleaved step by step in one run so
that all modes see the same machine load. Prints the median per mode and its ratio to non-DP.
`opacus-hooks` is Opacus's hooks mode as shipped (its own PrivacyEngine); `hooks`, `ghost`, `functorch`
are as fedward runs them (client.grad_sample's Conv2d sampler and no zeroed copies of per-sample
gradients; in `hooks`, no unused batch weight gradients, and the output gradient multiplied by the
batch size once instead of at every layer). `--modes` times only some modes beside the plain step:
with all four, each step runs after steps that have pushed its memory out of the caches. Every mode,
and the plain step, runs with glibc keeping freed memory (client.dp.keep_freed_memory, switched on at
the start, as a DP site's first round does for its process).

    python bench/bench_dp_overhead.py [--model cnn28] [--steps 30] [--batch 64] [--threads 0] [--device cpu]
                                      [--modes opacus-hooks hooks ghost functorch]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from opacus import GradSampleModule, PrivacyEngine  # noqa: E402
from opacus.grad_sample import grad_sample_module, grad_sample_module_fast_gradient_clipping  # noqa: E402
from opacus.grad_sample.conv import compute_conv_grad_sample  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from client.dp import keep_freed_memory, make_private  # noqa: E402
from client.grad_sample import OPACUS_CREATE_OR_ACCUMULATE, keep_or_add_grad_sample  # noqa: E402
from client.train import make_criterion  # noqa: E402
from common.models import build_model  # noqa: E402

MODES = ("opacus-hooks", "hooks", "ghost", "functorch")


SHAPES = {
    "cnn28": (1, 28, 28),
    "cnn28-ws": (1, 28, 28),
    "scatternet": (1, 28, 28),
    "cnn3d": (1, 16, 28, 28),
    "unet": (1, 28, 28),
}  # one input, per model


def batch(name: str, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(size, *SHAPES[name], generator=g)
    y = (x[:, 0] > 1.0).long() if name == "unet" else torch.arange(size) % 2  # masks, or labels
    return x.to(device), y.to(device)


@contextmanager
def opacus_as_shipped():
    """Opacus's own Conv2d / Conv3d per-sample gradients (unfold) and its zeroed copy of every layer's
    per-sample gradients, as shipped, instead of client.grad_sample's."""
    ours = {c: GradSampleModule.GRAD_SAMPLERS[c] for c in (nn.Conv2d, nn.Conv3d)}
    GradSampleModule.GRAD_SAMPLERS.update({c: compute_conv_grad_sample for c in ours})
    modules = (grad_sample_module, grad_sample_module_fast_gradient_clipping)
    for module in modules:
        module.create_or_accumulate_grad_sample = OPACUS_CREATE_OR_ACCUMULATE
    try:
        yield
    finally:
        GradSampleModule.GRAD_SAMPLERS.update(ours)
        for module in modules:
            module.create_or_accumulate_grad_sample = keep_or_add_grad_sample


def make_step(
    mode: str | None, x: torch.Tensor, y: torch.Tensor, device: torch.device, name: str = "cnn28"
) -> Callable[[], None]:
    """One training step of a fresh `name` model: plain (mode None), DP-SGD as fedward runs it in
    `mode`, or "opacus-hooks": Opacus's hooks mode as shipped (its own PrivacyEngine, its unfold conv
    sampler, autograd's batch weight gradients computed and thrown away)."""
    model = build_model(name, in_channels=1, num_classes=2, seed=0).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion = make_criterion(y, 2, False, "segmentation" if name == "unet" else "classification")
    as_shipped = mode == "opacus-hooks"
    if as_shipped:
        engine = PrivacyEngine(accountant="rdp")
        model, optimizer, _ = engine.make_private(
            module=model, optimizer=optimizer, data_loader=DataLoader(TensorDataset(x, y), batch_size=len(x)),
            noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False,
            noise_generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
    elif mode is not None:
        dp = make_private(
            noise_generator=torch.Generator().manual_seed(0),
            model=model,
            optimizer=optimizer,
            data_loader=DataLoader(TensorDataset(x, y), batch_size=len(x)),
            criterion=criterion,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            grad_sample_mode=mode,
            poisson_sampling=False,  # a fixed batch: we time the step, not the sampling
        )
        model, optimizer, criterion = dp.model, dp.optimizer, dp.criterion

    def step() -> None:
        with opacus_as_shipped() if as_shipped else nullcontext():
            optimizer.zero_grad(set_to_none=True)
            criterion(model(x), y).backward()
            optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=tuple(SHAPES), default="cnn28")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per mode first")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--modes", nargs="+", choices=MODES, default=list(MODES),
        help="DP modes to time beside the plain step (fewer: less cache traffic between the steps)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    keep_freed_memory()  # as a DP site does: for the plain step too, so both see the same allocator
    warnings.filterwarnings("ignore", module="opacus")  # secure RNG off, etc.
    warnings.filterwarnings("ignore", message=".*poisson_sampling=False.*")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")

    x, y = batch(args.model, args.batch, device)
    steps: dict[str, Callable[[], None]] = {"no DP": make_step(None, x, y, device, args.model)}
    for mode in args.modes:
        try:
            steps[mode] = make_step(mode, x, y, device, args.model)
            steps[mode]()
        except Exception as e:  # a mode this torch/opacus cannot run: report it, time the rest
            print(f"{mode}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
            steps.pop(mode, None)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for i in range(args.warmup + args.steps):
        order = names[i % len(names) :] + names[: i % len(names)]  # rotate: no fixed position
        for name in order:
            sync()
            t0 = time.perf_counter()
            steps[name]()
            sync()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)

    base = statistics.median(times["no DP"])
    threads = torch.get_num_threads()
    print(f"{args.model}, batch {args.batch}, {args.steps} steps per mode, {device} ({threads} threads)")
    print(f"{'mode':<10} {'median ms':>10} {'p90 ms':>8} {'DP/no-DP':>9}")
    for name, ts in times.items():
        med, p90 = statistics.median(ts), statistics.quantiles(ts, n=10)[-1]
        print(f"{name:<10} {med * 1e3:>10.1f} {p90 * 1e3:>8.1f} {med / base:>8.2f}x")


if __name__ == "__main__":
    main()
