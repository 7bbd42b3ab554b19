"""Study configs are read strictly: a wrong key, file, model or strategy is named before training."""

import subprocess
import sys
from pathlib import Path

import pytest

from common.config import ConfigError, load_study, with_changes
from common.data import load_site_data
from common.simulated import simulated_sites
from common.sitedata import SiteDataError


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


def test_shipped_configs_load(root, medmnist_dir):
    for name in ("demo", "pneumoniamnist", "breastmnist"):
        study = load_study(root / "configs" / f"{name}.yaml", data_dir=str(medmnist_dir))
        assert study.name == name
        assert len(simulated_sites(study)) == study.data.num_sites


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    path = _write(tmp_path, "data:\n  partition:\n    alfa: 0.3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'data\.partition\.alfa'.*Did you mean 'alpha'"):
        load_study(path)


def test_missing_data_file_names_the_file_and_the_override(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDWARD_DATA", raising=False)  # CI sets it, and it would override data_dir
    path = _write(tmp_path, "data:\n  source: medmnist\n  dataset: pneumoniamnist\n  data_dir: /nowhere\n")
    with pytest.raises(ConfigError, match=r"/nowhere/pneumoniamnist\.npz.*FEDWARD_DATA"):
        load_study(path)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("model:\n  name: resnet999\n", "model.name"),
        ("strategy:\n  name: fedsomething\n", "strategy.name"),
        ("strategy:\n  weighting: patients\n", "strategy.weighting"),
        ("strategy:\n  name: fedavgm\n  server_momentum: 1.0\n", "strategy.server_momentum"),
        ("strategy:\n  server_lr: -1\n", "strategy.server_lr"),
        ("rounds: 0\n", "rounds"),
        ("train:\n  lr: fast\n", "train.lr"),
        ("min_sites: 5\n", "min_sites"),
        ("name: " + "n" * 201 + "\n", "'name' must be 1 to 200 characters"),
    ],
)
def test_bad_values_name_their_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_study(_write(tmp_path, text))


def test_overrides_win_over_environment_and_file(tmp_path, monkeypatch, medmnist_dir):
    path = _write(tmp_path, "data:\n  source: medmnist\n  dataset: breastmnist\n  data_dir: /nowhere\n")
    monkeypatch.setenv("FEDWARD_DATA", str(medmnist_dir))
    assert load_study(path).data.data_dir == str(medmnist_dir)
    study = load_study(path, rounds=7, num_sites=2, data_dir=str(medmnist_dir))
    assert (study.rounds, study.data.num_sites) == (7, 2)


def test_site_without_training_images_is_refused(tmp_path):
    path = _write(tmp_path, "data:\n  num_sites: 2\n  synthetic:\n    train_per_site: 0\n")
    with pytest.raises(ConfigError, match="'data.synthetic.train_per_site' must be from 1"):
        load_study(path)  # a study config: refused as it is read
    site = simulated_sites(load_study(_write(tmp_path, "data:\n  num_sites: 2\n")))[0]
    site.data.synthetic.train_per_site = 0  # a site config: refused when its data is loaded
    with pytest.raises(SiteDataError, match="site 'hospital-a' has no training images"):
        load_site_data(site)


def test_changes_by_dotted_key_are_checked_as_the_file_is_and_leave_the_original(tmp_path):
    study = load_study(_write(tmp_path, "rounds: 3\ntrain:\n  lr: 0.001\n"))
    changed = with_changes(study, {"rounds": 50, "train.lr_decay": 0.965, "strategy.name": "fedprox"})
    assert (changed.rounds, changed.train.lr_decay, changed.strategy.name) == (50, 0.965, "fedprox")
    assert (study.rounds, study.train.lr_decay, study.strategy.name) == (3, 1.0, "fedavg")
    for changes, message in (
        ({"train.lrr": 0.1}, r"unknown key 'train\.lrr'.*Did you mean 'lr'"),
        ({"rounds.x": 1}, r"'rounds' is a value, not a section"),
        ({"train.lr": "fast"}, r"'train\.lr' must be a number"),
        ({"rounds": 0}, r"rounds"),
        ({"strategy.name": "fedsomething"}, r"strategy\.name"),
    ):
        with pytest.raises(ConfigError, match=message):
            with_changes(study, changes)


def test_reading_every_shipped_study_config_loads_neither_torch_nor_monai_nor_flower(root, medmnist_dir):
    """So a command refusing a config (or its run folder) answers at once: checked in a fresh process,
    the way `fedward simulate` reads its config before anything else."""
    code = (
        "import sys\nfrom pathlib import Path\nfrom common.config import load_study\n"
        "for path in sorted(Path('configs').glob('*.yaml')):\n"
        f"    load_study(path, data_dir={str(medmnist_dir)!r})\n"
        "print(sorted(m for m in ('torch', 'monai', 'flwr', 'opacus') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", proc.stdout
