"""Each site's model is chosen on its validation images: the best AUC, and among equal AUCs (a small
validation set often ranks every positive above every negative for several models) the lower
validation cross-entropy, whatever order the candidates come in."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from sklearn.metrics import log_loss
from torch import nn

from common.schema import StudyConfig
from common.sitedata import SiteData
from server.run_folder import Variant, model_key
from server.study.evaluate import Evaluator
from server.study.personal import best_for_site

SITE = "hospital-a"


def _site() -> SiteData:
    """Validation images whose first pixel says the class (+1 positive, -1 negative), but one
    positive's first pixel is -1.5: a model that reads it ranks that image below the negatives."""
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 1] * 20)
    x = torch.randn(40, 1, 2, 2, generator=g) * 0.05
    x[:, 0, 0, 0] = y.float() * 2 - 1
    val_x, val_y = x.clone(), y.clone()
    val_x[1, 0, 0, 0] = -1.5  # a positive that looks negative
    return SiteData(SITE, x, y, x, y, ["negative", "positive"], val_x=val_x, val_y=val_y)


def _model(scale: float) -> nn.Module:
    """Logits (-scale * p, scale * p) of the first pixel p."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.zero_()
        model[1].weight[:, 0] = torch.tensor([-scale, scale])
    return model


class _KnowsTheMisleadingPositive(nn.Module):
    """As `_model`, but it ranks the misleading positive with the positives (validation AUC 1)."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = x[:, 0, 0, 0].clone()
        p[p < -1.2] = 1.0
        return torch.stack([-self.scale * p, self.scale * p], dim=1)


def _choose(trained: dict[str, nn.Module]) -> dict:
    data = {SITE: _site()}
    evaluator = Evaluator(data, StudyConfig())
    models = {k: {"eval": {SITE: {"auc": 0.5}}} for k in trained}
    run = SimpleNamespace(doc={"primary": str(Variant.FEDERATED)}, evaluator=evaluator, data=data,
                          trained=trained, models=models)  # fmt: skip
    return best_for_site(run)[SITE]


def _cross_entropy(model: nn.Module) -> float:
    d = _site()
    with torch.no_grad():
        probs = torch.softmax(model(d.val_x), dim=1).numpy()
    return float(log_loss(d.val_y.numpy(), probs, labels=[0, 1]))


def test_equal_validation_aucs_go_to_the_lower_cross_entropy_not_the_first_candidate():
    local, federated = _model(0.3), _model(2.0)  # the same ranking: the same AUC
    assert _cross_entropy(federated) < _cross_entropy(local)
    chosen = _choose({model_key(Variant.LOCAL, SITE): local, str(Variant.FEDERATED): federated})
    assert chosen["validation"][model_key(Variant.LOCAL, SITE)] == chosen["validation"]["federated"] < 1.0
    assert chosen["model"] == "federated"
    ce = chosen["validation_cross_entropy"]
    assert ce["federated"] == round(_cross_entropy(federated), 6) < ce[model_key(Variant.LOCAL, SITE)]
    # and the other way round: the less confident model wins when it is the better calibrated one
    chosen = _choose({model_key(Variant.LOCAL, SITE): _model(2.0), str(Variant.FEDERATED): _model(40.0)})
    assert chosen["model"] == model_key(Variant.LOCAL, SITE)


def test_a_better_validation_auc_wins_over_a_lower_cross_entropy():
    knows, confident = _KnowsTheMisleadingPositive(0.3), _model(2.0)
    assert _cross_entropy(confident) < _cross_entropy(knows)
    chosen = _choose({model_key(Variant.LOCAL, SITE): confident, str(Variant.FEDERATED): knows})
    assert chosen["validation"]["federated"] == 1.0 > chosen["validation"][model_key(Variant.LOCAL, SITE)]
    assert chosen["model"] == "federated"
    assert np.isfinite(list(chosen["validation_cross_entropy"].values())).all()
