"""Opacus loads in a process only when privacy needs it (about a second of CPU per process): a site's
plain rounds, its exact evaluations (what a simulation's sites release) and building a network
Opacus's validator has nothing to check never import it; a private round (or a privately released
evaluation, which is charged) does, and is trained and charged as before. Each in a fresh process,
as a site's process starts."""

from __future__ import annotations

import json

from client.ledger import LEDGER_FILENAME
from tests.conftest import python_in_a_fresh_process

SITE = """
import json, sys, warnings
import torch
from client.site import SiteRuntime
from common.models import build_model
from common.privacy import request_config
from common.schema import (
    EvaluationPolicyConfig, PrivacyConfig, SiteConfig, SiteDataConfig, SitePolicyConfig, SyntheticConfig,
)
from tests.plans import round_config

warnings.simplefilter("ignore")
data = SiteDataConfig(format="synthetic", synthetic=SyntheticConfig(train_per_site=32, test_per_site=8))
policy = SitePolicyConfig(
    required=False, max_epsilon=50.0, delta=1e-5, evaluation=EvaluationPolicyConfig(release="exact")
)
site = SiteRuntime.load(SiteConfig(site="hospital-a", data=data, privacy=policy, state_dir=sys.argv[1]))
weights = build_model("cnn28", seed=1).state_dict()
seen = {}
plain = site.train(round_config(), dict(weights))
scored = site.evaluate(round_config(), plain.weights)
seen["plain"] = [not plain.refused, not scored.refused, "opacus" in sys.modules]
private_config = round_config(dp_enabled=True) | request_config(
    PrivacyConfig(enabled=True, noise_multiplier=1.0, delta=1e-5)
)
private = site.train(private_config, dict(weights))
seen["private"] = [not private.refused, "opacus" in sys.modules]
print(json.dumps(seen))
"""


def test_a_sites_plain_rounds_never_load_opacus_and_a_private_round_trains_and_is_charged(tmp_path):
    seen = json.loads(python_in_a_fresh_process(SITE, str(tmp_path / "state")).splitlines()[-1])
    assert seen == {"plain": [True, True, False], "private": [True, True]}
    ledger = [json.loads(line) for line in (tmp_path / "state" / LEDGER_FILENAME).read_text().splitlines()]
    trained = [entry for entry in ledger if entry["kind"] == "train"]
    assert len(trained) == 1 and trained[0]["steps"] > 0 and trained[0]["epsilon"] > 0  # charged


def test_layers_opacus_checks_are_its_validators_own_and_such_a_network_loads_it():
    """OPACUS_CHECKED_LAYERS is what decides, before Opacus is loaded, that a network needs it: it
    must list exactly the layer types Opacus's validator registers (an Opacus that adds one fails
    here), and a network holding one (MONAI's ResNet, with BatchNorm) still goes through Opacus."""
    probe = (
        "import sys\n"
        "from common.models import build_model\n"
        "from common.opacus_compat import OPACUS_CHECKED_LAYERS\n"
        "build_model('cnn28')\n"
        "print('opacus' in sys.modules)\n"
        "net = build_model('resnet10')\n"
        "print('opacus' in sys.modules, any('BatchNorm' in type(m).__name__ for m in net.modules()))\n"
        "from opacus.validators import ModuleValidator\n"
        "print(set(ModuleValidator.VALIDATORS) | set(ModuleValidator.FIXERS) == OPACUS_CHECKED_LAYERS)\n"
    )
    assert python_in_a_fresh_process(probe).split() == ["False", "True", "False", "True"]
