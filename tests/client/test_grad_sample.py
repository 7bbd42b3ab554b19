"""The grouped-convolution per-sample gradients (client.grad_sample) are the true per-sample gradients."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from opacus.grad_sample.conv import compute_conv_grad_sample
from torch import nn

import client.grad_sample as client_grad_sample
from client.grad_sample import conv_grad_sample, ws_conv_grad_sample
from common.models import build_model
from common.weight_standardization import WSConv2d


def _per_sample_by_autograd(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Reference: one backward pass per sample."""
    rows = []
    for i in range(len(x)):
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum").backward()
        rows.append([p.grad.detach().clone() for p in model.parameters()])
    return [torch.stack(col) for col in zip(*rows, strict=True)]


def _private_in_hooks_mode(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """client.dp.make_private in hooks mode over one batch of (x, y), noise 1, clip 1, SGD."""
    import warnings

    from torch.utils.data import DataLoader, TensorDataset

    from client.dp import make_private

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make_private(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(TensorDataset(x, y), batch_size=len(x)), criterion=nn.CrossEntropyLoss(),
            noise_multiplier=1.0, max_grad_norm=1.0, noise_generator=torch.Generator().manual_seed(0),
            grad_sample_mode="hooks", poisson_sampling=False,
        )  # fmt: skip


def _assert_opacus_matches_autograd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, atol: float) -> None:
    """Opacus's hooks (with client.grad_sample's samplers) give the per-sample gradients of autograd."""
    expected = _per_sample_by_autograd(model, x, y)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    for (name, p), want in zip(model.named_parameters(), expected, strict=True):
        assert torch.allclose(p.grad_sample, want, rtol=1e-4, atol=atol), name


@pytest.mark.parametrize(
    ("name", "shape"), [("cnn28", (1, 28, 28)), ("cnn28-ws", (1, 28, 28)), ("cnn3d-ws", (1, 6, 12, 12))]
)
def test_per_sample_gradients_match_one_backward_per_sample(name, shape):
    """Plain and weight-standardized convolutions (the latter through the standardization's Jacobian)."""
    torch.manual_seed(0)
    model = build_model(name, seed=1)
    _assert_opacus_matches_autograd(
        model, torch.randn(6, *shape), torch.tensor([0, 1, 1, 0, 1, 0]), atol=1e-5
    )
    assert GradSampleModule.GRAD_SAMPLERS[nn.Conv2d] is conv_grad_sample  # ours did the convs
    assert GradSampleModule.GRAD_SAMPLERS[WSConv2d] is ws_conv_grad_sample


def test_weight_standardized_kernels_are_standardized_and_keep_plain_keys():
    model, plain = build_model("cnn28-ws", seed=1), build_model("cnn28", seed=1)
    assert model.state_dict().keys() == plain.state_dict().keys()
    convs = [m for m in model.modules() if isinstance(m, WSConv2d)]
    assert len(convs) == 5
    w = convs[1].effective_weight().reshape(convs[1].out_channels, -1)
    assert torch.allclose(w.mean(dim=1), torch.zeros(len(w)), atol=1e-5)
    var = w.var(dim=1, unbiased=False)  # var / (var + eps): just under 1 for kernels of variance ~1e-3
    assert ((var > 0.97) & (var < 1.0)).all(), var
    x = torch.randn(2, 1, 28, 28)
    assert not torch.allclose(model(x), plain(x))  # the same weights give another function


@pytest.mark.parametrize(
    "conv",
    [
        dict(in_channels=4, out_channels=8, kernel_size=3, stride=2, padding=1),
        dict(in_channels=4, out_channels=8, kernel_size=(3, 5), padding=(1, 2), dilation=(1, 2), groups=2),
        dict(in_channels=3, out_channels=6, kernel_size=7, stride=2, padding=3, bias=False),
        dict(in_channels=3, out_channels=6, kernel_size=3, padding="same"),  # falls back to Opacus's
        dict(in_channels=3, out_channels=6, kernel_size=3, padding=1, padding_mode="reflect"),  # likewise
    ],
)
def test_conv_layers_give_opacus_per_sample_gradients(conv):
    torch.manual_seed(0)
    layer = nn.Conv2d(**conv)
    x = torch.randn(5, conv["in_channels"], 17, 15)
    backprops = torch.randn_like(layer(x))
    ours, opacus = conv_grad_sample(layer, [x], backprops), compute_conv_grad_sample(layer, [x], backprops)
    assert set(ours) == set(opacus)
    for p in opacus:
        assert torch.allclose(ours[p], opacus[p], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "conv",
    [
        dict(in_channels=2, out_channels=4, kernel_size=3, padding=1, bias=False),
        dict(
            in_channels=4,
            out_channels=6,
            kernel_size=(1, 3, 3),
            stride=(1, 2, 2),
            padding=(0, 1, 1),
            groups=2,
        ),
    ],
)
def test_conv3d_layers_give_opacus_per_sample_gradients(conv):
    torch.manual_seed(0)
    layer = nn.Conv3d(**conv)
    x = torch.randn(3, conv["in_channels"], 6, 9, 8)
    backprops = torch.randn_like(layer(x))
    ours, opacus = conv_grad_sample(layer, [x], backprops), compute_conv_grad_sample(layer, [x], backprops)
    assert GradSampleModule.GRAD_SAMPLERS[nn.Conv3d] is conv_grad_sample and set(ours) == set(opacus)
    for p in opacus:
        assert torch.allclose(ours[p], opacus[p], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("name", "shape"), [("cnn28", (1, 28, 28)), ("cnn3d", (1, 8, 12, 12)), ("cnn28-ws", (1, 28, 28))]
)
def test_hooks_mode_without_batch_weight_grads_updates_exactly_like_opacus(name, shape):
    """client.dp skips autograd's (unused) batch weight gradient of conv layers in hooks mode: the
    clipped, noised update must be what Opacus gives with the layers' own forward."""
    import warnings

    from torch.utils.data import DataLoader, TensorDataset

    from client.dp import make_private

    torch.manual_seed(0)
    x, y = torch.randn(16, *shape), torch.randint(0, 2, (16,))
    updates = []
    for skip in (True, False):
        model = build_model(name, seed=3)
        before = [p.detach().clone() for p in model.parameters()]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dp = make_private(
                noise_generator=torch.Generator().manual_seed(0),
                model=model,
                optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
                data_loader=DataLoader(TensorDataset(x, y), batch_size=16),
                criterion=nn.CrossEntropyLoss(),
                noise_multiplier=1e-9,  # compare clipping and averaging, not noise draws
                max_grad_norm=0.05,
                grad_sample_mode="hooks",
                poisson_sampling=False,
            )
        assert len(dp.detached) == 10  # 5 conv and 5 GroupNorm layers
        if not skip:
            dp.keep_batch_weight_grads()
        for _ in range(2):
            dp.optimizer.zero_grad()
            dp.criterion(dp.model(x), y).backward()
            dp.optimizer.step()
        plain = dp.unwrap()
        assert all("forward" not in m.__dict__ for m in plain.modules())  # restored
        updates.append(
            torch.cat([(p.detach() - b).flatten() for p, b in zip(plain.parameters(), before, strict=True)])
        )
    assert updates[0].abs().max() > 1e-4  # it trained
    assert torch.allclose(updates[0], updates[1], rtol=1e-4, atol=1e-6)


def test_a_layer_used_twice_in_one_pass_gets_the_sum_of_both_uses_per_sample():
    """client.grad_sample keeps the sampler's tensor instead of Opacus's zeroed copy; a layer's second
    use in the same forward pass must still add to it (and change no tensor a sampler returned)."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.out = nn.Linear(5, 5), nn.Linear(5, 2)

        def forward(self, x):
            return self.out(self.lin(torch.tanh(self.lin(x))))

    torch.manual_seed(0)
    _assert_opacus_matches_autograd(Twice(), torch.randn(7, 5), torch.randint(0, 2, (7,)), atol=1e-6)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
@pytest.mark.parametrize("name", ["cnn28", "cnn28-ws", "scatternet"])
def test_an_empty_poisson_batch_steps_with_noise_alone(name, mode):
    """Poisson sampling draws empty batches; each must still be a step (noise only), never an error
    that would tell the coordinator a batch came out empty."""
    import warnings

    from torch.utils.data import DataLoader, TensorDataset

    from client.dp import make_private

    model = build_model(name, seed=3)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 2, (8,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp = make_private(
            noise_generator=torch.Generator().manual_seed(0), model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
            data_loader=DataLoader(TensorDataset(x, y), batch_size=8), criterion=nn.CrossEntropyLoss(),
            noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode,
        )  # fmt: skip
    before = [p.detach().clone() for p in model.parameters()]
    dp.optimizer.zero_grad()
    dp.criterion(dp.model(x[:0]), y[:0]).backward()
    dp.optimizer.step()
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)])
    assert dp.steps == 1 and moved.abs().min() > 0  # every weight got noise, as a step of a real batch does


@pytest.mark.parametrize("mode", ["hooks", "ghost", "functorch"])
@pytest.mark.parametrize("name", ["cnn28-ws", "scatternet"])
def test_every_mode_a_coordinator_may_ask_for_clips_each_sample_of_the_new_networks_by_hand(name, mode):
    """The coordinator names the model and the per-sample gradient mode. For the weight-standardized
    `cnn28-ws` and the scattering `scatternet`, in every mode the DP update must be the mean of
    per-sample gradients each clipped to max_grad_norm, computed by hand (one backward pass per sample),
    so no sample ever contributes more than the clip."""
    import warnings

    from torch.utils.data import DataLoader, TensorDataset

    from client.dp import make_private

    torch.manual_seed(0)
    n, clip = 8, 0.05  # a clip well under the gradients' norms: every sample is clipped
    x, y = torch.randn(n, 1, 28, 28), torch.randint(0, 2, (n,))
    grads = _per_sample_by_autograd(build_model(name, seed=3), x, y)  # reduction sum per sample
    flat = torch.cat([g.reshape(n, -1) for g in grads], dim=1)
    assert flat.norm(dim=1).min() > clip
    expected = (flat * (clip / flat.norm(dim=1, keepdim=True))).sum(0) / n

    model = build_model(name, seed=3)
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp = make_private(
            noise_generator=torch.Generator().manual_seed(0), model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
            data_loader=DataLoader(TensorDataset(x, y), batch_size=n), criterion=nn.CrossEntropyLoss(),
            noise_multiplier=1e-9, max_grad_norm=clip, grad_sample_mode=mode, poisson_sampling=False,
        )  # fmt: skip
        dp.optimizer.zero_grad()
        dp.criterion(dp.model(x), y).backward()
        dp.optimizer.step()
    update = before - torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.allclose(update, expected, atol=1e-6, rtol=1e-3), float((update - expected).abs().max())


@pytest.mark.parametrize("views", [1, 3])
def test_hooks_mode_gives_opacus_per_sample_gradients_of_a_weighted_mean_loss(views):
    """fedward's hooks multiply the output gradient by the batch size once, at the model's output,
    instead of at every layer as Opacus does: per-sample gradients and the clipped, noised update
    must be Opacus's own, for a class-weighted mean loss (client.train's class balance), a batch
    size other than the expected one and augmentation multiplicity's views."""
    import copy
    import warnings

    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from client.dp import make_private
    from client.train import average_views

    torch.manual_seed(0)
    x, y = torch.randn(13 * views, 1, 28, 28), torch.randint(0, 2, (13 * views,))
    criterion = nn.CrossEntropyLoss(weight=torch.tensor([0.3, 1.7]))
    model = build_model("cnn28", seed=3)
    ours_model, theirs_model, before = model, copy.deepcopy(model), copy.deepcopy(model)
    settings = dict(noise_multiplier=1e-9, max_grad_norm=0.05, poisson_sampling=False)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)  # expected batch 8, this one 13
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = make_private(
            model=ours_model, optimizer=torch.optim.SGD(ours_model.parameters(), lr=0.5), data_loader=loader,
            criterion=criterion, noise_generator=torch.Generator().manual_seed(0), grad_sample_mode="hooks",
            **settings,
        )  # fmt: skip
        theirs = PrivacyEngine(accountant="rdp").make_private(
            module=theirs_model, optimizer=torch.optim.SGD(theirs_model.parameters(), lr=0.5),
            data_loader=loader, noise_generator=torch.Generator().manual_seed(0), grad_sample_mode="hooks",
            **settings,
        )  # fmt: skip
        for dp_model, optimizer in ((ours.model, ours.optimizer), theirs[:2]):
            optimizer.zero_grad()
            criterion(dp_model(x), y).backward()
            if views > 1:
                average_views(dp_model, views)
    ours_samples = [p.grad_sample for p in ours_model.parameters()]
    for p, want in zip(ours_samples, [p.grad_sample for p in theirs_model.parameters()], strict=True):
        assert p.shape == want.shape and p.shape[0] == 13
        assert torch.allclose(p, want, rtol=1e-4, atol=1e-6), float((p - want).abs().max())
    assert max(float(s.abs().max()) for s in ours_samples) > 1e-3  # real gradients, not zeros
    ours.optimizer.step()
    theirs[1].step()
    for a, b in zip(ours_model.parameters(), theirs_model.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8)
    moved = [
        not torch.equal(a, b) for a, b in zip(ours.unwrap().parameters(), before.parameters(), strict=True)
    ]
    assert all(moved)  # every parameter stepped


def test_hooks_mode_refuses_a_model_whose_output_is_not_one_batch_first_tensor():
    """The output gradient is multiplied by the batch size once, at the output: a model returning
    anything else (a tuple, a batch-last tensor) must fail, not train with gradients scaled wrongly."""

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            return (self.lin(x),), x

    class BatchLast(Pair):
        def forward(self, x):
            return self.lin(x).T

    x, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    for model in (Pair(), BatchLast()):
        dp = _private_in_hooks_mode(model, x, y)
        with pytest.raises(TypeError, match="one tensor with the batch first"):
            dp.model(x)


@pytest.mark.parametrize(
    ("name", "shape"), [("cnn28", (1, 28, 28)), ("cnn3d", (1, 6, 12, 12)), ("scatternet", (1, 28, 28))]
)
def test_group_norm_per_sample_gradients_come_from_the_statistics_of_the_forward_pass(
    name, shape, monkeypatch
):
    """In hooks mode a GroupNorm keeps each sample's mean and 1/std from its forward pass and its
    per-sample gradients come from them (Opacus's second normalization is never called): they must
    be one backward pass per sample's, for images, volumes and a GroupNorm whose input needs no
    gradient (scatternet's, behind the fixed scattering), and the kept statistics are used up."""
    import copy

    import client.grad_sample

    def opacus_recomputation(*args, **kwargs):
        raise AssertionError("GroupNorm fell back to Opacus's sampler")

    monkeypatch.setattr(client.grad_sample, "compute_group_norm_grad_sample", opacus_recomputation)
    torch.manual_seed(0)
    x, y = torch.randn(6, *shape), torch.tensor([0, 1, 1, 0, 1, 0])
    model = build_model(name, seed=2)
    expected = _per_sample_by_autograd(copy.deepcopy(model), x, y)
    dp = _private_in_hooks_mode(model, x, y)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m in dp.detached for m in norms)
    dp.criterion(dp.model(x), y).backward()
    for (param_name, p), want in zip(model.named_parameters(), expected, strict=True):
        assert torch.allclose(p.grad_sample, want, rtol=1e-4, atol=1e-5), param_name
    assert all(not m.__dict__[client.grad_sample.KEPT_STATS] for m in norms)  # each used once
    dp.unwrap()
    assert all(client.grad_sample.KEPT_STATS not in m.__dict__ for m in norms)


class _FlatNorm(nn.Module):
    """A GroupNorm over (N, C) features, as a BatchNorm1d head becomes in an Opacus-compatible model."""

    def __init__(self):
        super().__init__()
        self.lin, self.norm, self.out = nn.Linear(30, 8), nn.GroupNorm(2, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.lin(x.flatten(1)))))


class _StridedNorm(nn.Module):
    """A GroupNorm fed a transposed (not contiguous) view of a conv layer's output."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm, self.out = nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.norm(self.conv(x).transpose(2, 3)).mean(dim=(2, 3)))


@pytest.mark.parametrize("frozen_bias", [False, True])
@pytest.mark.parametrize("model_class", [_FlatNorm, _StridedNorm])
def test_group_norm_per_sample_gradients_of_feature_vectors_and_strided_inputs(model_class, frozen_bias):
    """Found by an independent review: summing a (N, C) GroupNorm's gradients over 'no positions'
    summed over the batch, so each sample's row depended on every other sample (with a frozen bias,
    silently); and a view that is not contiguous broke the kept-statistics forward. Each sample's
    gradient must be its own one-sample backward pass's, and changing one sample must change its
    row alone."""
    torch.manual_seed(0)
    x, y = torch.randn(5, 1, 5, 6), torch.tensor([0, 1, 1, 0, 1])
    rows = []
    for batch in (x, torch.cat([x[:4], 3 * torch.randn(1, 1, 5, 6)])):  # the last sample changed
        torch.manual_seed(1)  # the same weights for both batches
        model = model_class()
        if frozen_bias:
            model.norm.bias.requires_grad_(False)
        trainable = [p for p in model.parameters() if p.requires_grad]
        expected = []
        for i in range(len(batch)):
            model.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(batch[i : i + 1]), y[i : i + 1], reduction="sum").backward()
            expected.append([p.grad.detach().clone() for p in trainable])
        dp = _private_in_hooks_mode(model, batch, y)
        dp.criterion(dp.model(batch), y).backward()
        for j, p in enumerate(trainable):
            want = torch.stack([e[j] for e in expected])
            assert torch.allclose(p.grad_sample, want, rtol=1e-4, atol=1e-6), (j, p.shape)
        assert not model.norm.__dict__[client_grad_sample.KEPT_STATS]  # the kept statistics were used
        rows.append(model.norm.weight.grad_sample.detach().clone())
    assert torch.allclose(
        rows[0][:4], rows[1][:4], rtol=1e-6, atol=1e-8
    )  # the other samples' rows: as they were
    assert not torch.allclose(rows[0][4], rows[1][4], rtol=1e-2)
