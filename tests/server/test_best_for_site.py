"""Each site's model is chosen on its validation images: the best AUC, and among equal AUCs (a small
validation set often ranks every positive above every negative for several models) the lower
validation cross-entropy, whatever order the candidates come in."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score
from torch import nn

from common.schema import StudyConfig
from common.sitedata import SiteData
from server.run_folder import Variant, model_key
from server.study.evaluate import Evaluator
from server.study.personal import best_for_site, chosen_pooled

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


def test_all_test_data_together_is_scored_by_each_sites_chosen_model():
    """Two sites; at hospital-b the test images' first pixel sits 2.5 lower (another scanner), so a
    model that reads it ranks every site's images right within the site but not across sites; the
    local model of hospital-b knows its offset. `chosen_pooled` scores each site's test data with the
    site's own choice, and the pooled AUC's parts say where it ranks wrong."""
    a, b = _site(), _site()
    b.site = "hospital-b"
    b.test_x, b.val_x = b.test_x.clone(), b.val_x.clone()
    b.test_x[:, 0, 0, 0] -= 2.5
    b.val_x[:, 0, 0, 0] -= 2.5
    b.val_x[1, 0, 0, 0] = -1.5 - 2.5  # still the one misleading positive
    data = {SITE: a, "hospital-b": b}
    evaluator = Evaluator(data, StudyConfig())
    shifted = nn.Sequential(_Shift(2.5), _model(2.0))  # hospital-b's own model: undoes its offset
    trained = {str(Variant.FEDERATED): _model(2.0), model_key(Variant.LOCAL, "hospital-b"): shifted}
    models = {}
    for key, model in trained.items():
        evaluator.predict(key, model, sites=None if key == "federated" else ["hospital-b"])
        models[key] = {"eval": evaluator.evaluate(key)}
    run = SimpleNamespace(doc={"primary": str(Variant.FEDERATED)}, evaluator=evaluator, data=data,
                          trained=trained, models=models)  # fmt: skip
    best = best_for_site(run)
    assert best[SITE]["model"] == "federated"
    assert best["hospital-b"]["model"] == model_key(
        Variant.LOCAL, "hospital-b"
    )  # the same AUC, lower cross-entropy
    chosen = chosen_pooled(run, best)
    assert chosen["models"] == {SITE: "federated", "hospital-b": model_key(Variant.LOCAL, "hospital-b")}
    labels = np.concatenate([a.test_y.numpy(), b.test_y.numpy()])
    scores = np.concatenate([evaluator.outputs["federated"][SITE][:, 1],
                             evaluator.outputs[model_key(Variant.LOCAL, "hospital-b")]["hospital-b"][:, 1]])  # fmt: skip
    assert chosen["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6) == 1.0
    # the federated model alone: right within each site, wrong across them (b's positives below a's negatives)
    fed = models["federated"]["eval"]["pooled"]
    assert fed["auc_parts"]["within_sites"] == 1.0
    assert fed["auc_parts"]["across_sites"] < 0.8
    assert fed["auc"] == pytest.approx(roc_auc_score(labels, np.concatenate(
        [evaluator.outputs["federated"][s][:, 1] for s in data])), abs=1e-6)  # fmt: skip
    assert chosen["auc_parts"]["across_sites"] == 1.0
    # a site without a choice: nothing pooled
    assert chosen_pooled(run, {SITE: best[SITE]}) is None


class _Shift(nn.Module):
    def __init__(self, by: float):
        super().__init__()
        self.by = by

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[:, 0, 0, 0] += self.by
        return x
