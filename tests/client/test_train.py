"""Local training on its own (no Flower): counts, FedProx's proximal pull, probabilities."""

import torch

from client.train import make_optimizer, predict, train_epochs, train_loader
from common.models import build_model


def _data(n: int = 96):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.rand(n, 1, 28, 28, generator=g) + y[:, None, None, None] * 0.3
    return x, y


def _drift(mu: float) -> float:
    x, y = _data()
    model = build_model("cnn28", seed=1)
    start = [p.detach().clone() for p in model.parameters()]
    train_epochs(
        model,
        train_loader(x, y, 16, torch.Generator().manual_seed(0)),
        make_optimizer(model, "sgd", 0.05),
        epochs=2,
        proximal_mu=mu,
    )
    return float(
        sum((p.detach() - s).pow(2).sum() for p, s in zip(model.parameters(), start, strict=True)).sqrt()
    )


def test_train_epochs_counts_examples_and_steps():
    x, y = _data(100)
    model = build_model("cnn28")
    result = train_epochs(
        model,
        train_loader(x, y, 32, torch.Generator().manual_seed(0)),
        make_optimizer(model, "adam", 1e-3),
        epochs=2,
    )
    assert (result.num_examples, result.steps) == (200, 8)
    assert result.loss > 0 and result.seconds > 0


def test_fedprox_proximal_term_keeps_local_weights_near_the_global_model():
    near, free = _drift(mu=5.0), _drift(mu=0.0)
    # a strong proximal term (mu 5) must pull the local weights clearly back, not by a rounding margin
    assert near < 0.7 * free, f"drift with mu 5: {near:.4f}, without: {free:.4f}"


def test_predict_returns_probabilities():
    x, _ = _data(10)
    probs = predict(build_model("cnn28"), x)
    assert probs.shape == (10, 2)
    assert abs(probs.sum(1) - 1).max() < 1e-6
