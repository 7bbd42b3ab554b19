"""Networks made trainable by Opacus: the one conversion coordinator and sites both apply.

`make_opacus_compatible(model)` replaces what Opacus cannot train (BatchNorm becomes GroupNorm, via
`ModuleValidator.fix`) and removes in-place operations on layer outputs, deterministically, so every
party that builds the same architecture gets the same state_dict keys and shapes
(`common.models.build_model` calls it for every network).

Opacus's validator looks only at layers of the types it has validators or fixers for (BatchNorm,
InstanceNorm, LSTM, GRU, multi-head attention): a network with none of them, such as fedward's own
`cnn28` family, passes it unchanged. Such a network skips Opacus altogether, so that a process that
never trains privately (the coordinator, a non-private site, evaluation, `fedward predict`) does not
pay Opacus's import (about a second: all of Opacus, torch.distributed, SciPy's statistics).
"""

from __future__ import annotations

import sys

import torch
from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck
from torch import nn

# The layer types Opacus's ModuleValidator has validators or fixers for (opacus/validators/, 1.6):
# tested equal to its registry, so an Opacus that adds one fails the test rather than this check.
OPACUS_CHECKED_LAYERS: frozenset[type] = frozenset(
    {
        nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
        nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
        nn.LSTM, nn.GRU, nn.MultiheadAttention,
    }
)  # fmt: skip


class IncompatibleModelError(ValueError):
    """The model cannot be trained with Opacus, even after `ModuleValidator.fix`."""


def make_opacus_compatible(model: torch.nn.Module) -> torch.nn.Module:
    """Return `model` as Opacus can train it: BatchNorm becomes GroupNorm, and so on.

    `ModuleValidator.fix` replaces the layers it knows how to replace, deterministically, so the
    coordinator and every site that fix the same architecture get the same state_dict keys and
    shapes; it works on a copy. In-place operations on layer outputs, which Opacus's hooks cannot
    train through, are made out-of-place (same weights, same outputs). The result is then validated
    (in training mode; the mode is restored afterwards). A network with no layer Opacus's validator
    checks (`_checked_by_opacus`) needs neither: it comes back itself, in-place operations made
    out-of-place, and Opacus is not imported.

    Raises:
        IncompatibleModelError: a layer that Opacus cannot fix remains; the message lists
            Opacus's own reasons.
    """
    if not _checked_by_opacus(model):
        _remove_inplace_ops(model)
        return model
    from opacus.validators import ModuleValidator
    from opacus.validators.errors import UnsupportedModuleError

    fixed = ModuleValidator.fix(model)
    _remove_inplace_ops(fixed)
    was_training = fixed.training
    fixed.train()
    try:
        ModuleValidator.validate(fixed, strict=True)
    except UnsupportedModuleError as e:
        errors = e.args[0] if e.args and isinstance(e.args[0], list) else [e]
        reasons = "\n".join(f"  - {err}" for err in errors)
        raise IncompatibleModelError(
            f"{type(model).__name__} cannot be trained with differential privacy, even after "
            f"opacus.validators.ModuleValidator.fix:\n{reasons}\n"
            "Replace these layers (e.g. BatchNorm -> GroupNorm, LSTM -> opacus.layers.DPLSTM, "
            "no frozen-statistics layers) or choose another model in the study config."
        ) from e
    finally:
        fixed.train(was_training)
    return fixed


def _checked_by_opacus(model: nn.Module) -> bool:
    """Whether a layer of `model` is of a type Opacus's validator checks: those in its registry once
    Opacus is loaded (validators registered by a user's code included), else OPACUS_CHECKED_LAYERS."""
    validators = sys.modules.get("opacus.validators.module_validator")
    if validators is None:
        checked = OPACUS_CHECKED_LAYERS
    else:
        registry = validators.ModuleValidator
        checked = registry.VALIDATORS.keys() | registry.FIXERS.keys()
    return any(type(layer) in checked for layer in model.modules())


def _remove_inplace_ops(model: torch.nn.Module) -> None:
    """Stop in-place writes to the outputs of trainable layers; weights and keys are unchanged.

    Opacus computes per-sample gradients with full backward hooks, and PyTorch forbids modifying a
    hooked layer's output in place ("Output 0 of BackwardHookFunctionBackward is a view and is
    being modified inplace", pytorch/pytorch#61519). `ModuleValidator.validate` does not catch
    this; training fails at its first step. So activations with `inplace=True` become
    out-of-place, and MONAI's ResNet blocks (`out += residual`) get an out-of-place forward.
    """
    for module in model.modules():
        if getattr(module, "inplace", None) is True:
            module.inplace = False
        if type(module) in _OUT_OF_PLACE:
            module.__class__ = _OUT_OF_PLACE[type(module)]


def _resnet_forward(block: ResNetBlock | ResNetBottleneck, x: torch.Tensor) -> torch.Tensor:
    """MONAI's ResNetBlock / ResNetBottleneck forward, with `out + residual` instead of `+=`."""
    convs = 3 if isinstance(block, ResNetBottleneck) else 2
    out = x
    for i in range(1, convs + 1):
        out = getattr(block, f"bn{i}")(getattr(block, f"conv{i}")(out))
        if i < convs:
            out = block.act(out)
    residual = x if block.downsample is None else block.downsample(x)
    return block.act(out + residual)


class OutOfPlaceResNetBlock(ResNetBlock):
    """monai.networks.nets.resnet.ResNetBlock that Opacus's backward hooks can train."""

    forward = _resnet_forward


class OutOfPlaceResNetBottleneck(ResNetBottleneck):
    """monai.networks.nets.resnet.ResNetBottleneck that Opacus's backward hooks can train."""

    forward = _resnet_forward


_OUT_OF_PLACE: dict[type, type] = {
    ResNetBlock: OutOfPlaceResNetBlock,
    ResNetBottleneck: OutOfPlaceResNetBottleneck,
}
