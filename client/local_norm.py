"""FedBN-style personalization: a site keeps its normalization layers' parameters to itself.

With the study's `strategy.local_norm`, the affine parameters (weight and bias) of every GroupNorm,
LayerNorm, InstanceNorm and BatchNorm layer are the site's own: a site trains the global model with
its own normalization parameters in place (the global ones the first time), keeps the trained ones in
its state folder (`<state_dir>/local-norm/<study id>.safetensors`, or in memory without one), and
sends back its update with those parameters exactly as it received them, so they carry nothing of
its data; it evaluates with its own. Li et al., "FedBN: Federated Learning on Non-IID Features via
Local Batch Normalization", ICLR 2021: the normalization absorbs a site's acquisition.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn

from common.files import name_from_id, write_atomic

NORM_LAYERS = (
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
)
_MEMORY: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # sites without a state folder


def norm_keys(model: nn.Module) -> list[str]:
    """The state-dict keys of the model's normalization parameters (affine weight and bias)."""
    keys = []
    for name, module in model.named_modules():
        if isinstance(module, NORM_LAYERS):
            keys += [
                f"{name}.{p}" for p, value in module.named_parameters(recurse=False) if value is not None
            ]
    return keys


def _path(state_dir: str, study_id: str) -> Path:
    return Path(state_dir).expanduser() / "local-norm" / f"{name_from_id(study_id)}.safetensors"


def load_local(state_dir: str | None, study_id: str) -> dict[str, torch.Tensor] | None:
    """The site's own normalization parameters for the study, or None before its first round."""
    if not state_dir:
        return _MEMORY.get(("", study_id))
    path = _path(state_dir, study_id)
    return load_file(path) if path.exists() else None


def save_local(state_dir: str | None, study_id: str, params: Mapping[str, torch.Tensor]) -> None:
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in params.items()}
    if not state_dir:
        _MEMORY[("", study_id)] = tensors
        return
    path = _path(state_dir, study_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, save(tensors))


def with_local(weights: Mapping[str, torch.Tensor], local: Mapping[str, torch.Tensor] | None) -> dict:
    """The global weights with the site's own normalization parameters in place (when it has them)."""
    return {**weights, **(dict(local) if local else {})}


def reply_weights(
    trained: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor], keys: list[str]
) -> dict:
    """What leaves the site: the trained weights, the normalization parameters as received."""
    return {k: (received[k].detach().clone() if k in keys else v) for k, v in trained.items()}
