"""SCAFFOLD's drift correction at a site (Karimireddy et al., "SCAFFOLD: Stochastic Controlled
Averaging for Federated Learning", ICML 2020), as server.scaffold sends it.

The coordinator keeps every control variate itself and sends each site its correction c - c_i beside
the global model (keys under common.keys.CORRECTION_PREFIX). After every optimizer step the site moves
each parameter by -lr x its correction, so a site whose data pulls away from the others' is pulled
back. The correction is applied after the step, so under DP-SGD it never enters the clipped, noised
gradient: whatever the coordinator sends, the update released is post-processing of the noised
gradients and of values the coordinator already holds, and the site's epsilon is unchanged. A
correction that does not fit the model (a missing, extra or misshapen key, a value not real or not
finite) is refused, naming the key, and so is any correction beside site-local normalization
(client.local_norm: those parameters are the site's own).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from common.keys import CORRECTION_PREFIX


def split_correction(
    arrays: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """(the global model's weights, the drift correction by parameter name or None when none came)."""
    weights = {k: v for k, v in arrays.items() if not k.startswith(CORRECTION_PREFIX)}
    correction = {
        k[len(CORRECTION_PREFIX) :]: v for k, v in arrays.items() if k.startswith(CORRECTION_PREFIX)
    }
    return weights, correction or None


def correction_problem(
    model: nn.Module, correction: Mapping[str, torch.Tensor], local_norm: bool = False
) -> str | None:
    """Why `correction` cannot be applied to `model` (one tensor per trainable parameter, same shape,
    real and finite; never beside `local_norm`, whose parameters are the site's own); None when it can."""
    if local_norm:
        return "a SCAFFOLD correction with site-local normalization (local-norm) is not accepted"
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, extra = sorted(params.keys() - correction.keys()), sorted(correction.keys() - params.keys())
    if missing or extra:
        return (f"the SCAFFOLD correction does not fit model: missing {missing[:3] or 'none'}, "
                f"not parameters {extra[:3] or 'none'}")  # fmt: skip
    for name, value in correction.items():
        if tuple(value.shape) != tuple(params[name].shape):
            return f"the SCAFFOLD correction of '{name}' is {list(value.shape)}, the parameter {list(params[name].shape)}"
        if not value.is_floating_point():
            return f"the SCAFFOLD correction of '{name}' is {value.dtype}, not real floating point"
        if not torch.isfinite(value.to(params[name].dtype)).all():  # as applied: 1e300 is inf in float32
            return f"the SCAFFOLD correction of '{name}' holds NaN or infinite values"
    return None


def correct_after_each_step(
    optimizer: torch.optim.Optimizer, model: nn.Module, correction: Mapping[str, torch.Tensor]
) -> None:
    """After every step of `optimizer` (the plain optimizer: with DP-SGD, the one Opacus wraps, which
    steps only on the noised gradient of a whole logical batch), p -= lr x correction[p]."""
    pairs = [
        (p, correction[name].to(device=p.device, dtype=p.dtype))
        for name, p in model.named_parameters()
        if p.requires_grad
    ]
    lr = optimizer.param_groups[0]["lr"]

    @torch.no_grad()
    def shift(*_args) -> None:
        for p, c in pairs:
            p.sub_(c, alpha=lr)

    optimizer.register_step_post_hook(shift)
