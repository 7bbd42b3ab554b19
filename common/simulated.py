"""The sites of a simulated study: facts of a simulation, not of the config schema.

With `data.source: synthetic` or `medmnist` the study config itself describes its sites: site i holds
partition i of the data set (its name from `data.site_names`, else hospital-a, hospital-b, ...). With
`data.source: sites` each site is a site config file. `fedward simulate`, `fedward study` and a
ClientApp run by `flwr run .` in simulation all get their sites from `simulated_sites`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from common.config import ConfigError, load_site, medmnist_path
from common.schema import (
    EvaluationPolicyConfig,
    PreprocessConfig,
    RoundLimitsConfig,
    SiteConfig,
    SiteDataConfig,
    SitePartition,
    SitePolicyConfig,
    StudyConfig,
)


def site_names(study: StudyConfig) -> list[str]:
    n = study.data.num_sites
    names = list(study.data.site_names)
    names += [f"hospital-{chr(ord('a') + i)}" if i < 26 else f"site-{i + 1}" for i in range(len(names), n)]
    if len(set(names)) != len(names):
        raise ConfigError(f"{study.source_path}: 'data.site_names' has duplicates: {names}.")
    return names


def num_sites(study: StudyConfig) -> int:
    """How many sites the study has: `data.num_sites`, or one per site config with `data.source: sites`."""
    return len(study.data.site_configs) if study.data.source == "sites" else study.data.num_sites


def simulated_sites(study: StudyConfig, state_root: str | Path | None = None) -> list[SiteConfig]:
    """The site configs of a simulated study, in partition order (site i is partition i).

    With `data.source: sites` each site is its own site config file. Otherwise the data of site i is
    partition i of the study's data set, and when `data.site_configs` is given, the i-th file's site
    name, privacy policy and state_dir apply to site i (its `data` section is not used). A site
    without a state_dir keeps its privacy ledger under `state_root/<site>`.
    """
    sites = _partition_sites(study) if study.data.source != "sites" else []
    base = Path(study.source_path).parent if study.source_path else Path.cwd()
    for i, path in enumerate(study.data.site_configs):
        own = load_site(path if Path(path).is_absolute() or Path(path).exists() else base / path)
        if study.data.source == "sites":
            sites.append(own)
        elif i < len(sites):
            sites[i].site, sites[i].privacy, sites[i].state_dir = own.site, own.privacy, own.state_dir
            sites[i].source_path = own.source_path
    for site in sites:
        if not site.state_dir and state_root is not None:
            site.state_dir = str(Path(state_root) / site.site)
    return sites


def _partition_sites(study: StudyConfig) -> list[SiteConfig]:
    from common.model_spec import model_spec  # late: it imports common.config, as this module does

    channels = model_spec(study).in_channels  # the sites read their images as the study's model takes them
    reading = {
        "colour": "rgb" if channels == 3 else "grey",
        "preprocess": PreprocessConfig(channels=channels, normalize=study.data.normalize),
    }
    sites = []
    for i, name in enumerate(site_names(study)):
        part = SitePartition(
            index=i,
            num_sites=study.data.num_sites,
            scheme=study.data.partition.scheme,
            alpha=study.data.partition.alpha,
            acquisition_shift=study.data.partition.acquisition_shift,
            min_train_per_site=study.data.partition.min_train_per_site,
            min_test_per_class=study.data.partition.min_test_per_class,
            seed=study.seed if study.data.partition.seed is None else study.data.partition.seed,
        )
        if study.data.source == "medmnist":
            data = SiteDataConfig(
                format="medmnist", path=str(medmnist_path(study)), partition=part, **reading
            )
        else:
            synthetic = dataclasses.replace(study.data.synthetic, masks=study.task == "segmentation")
            data = SiteDataConfig(format="synthetic", partition=part, synthetic=synthetic, **reading)
        # sites a simulation makes from the study itself follow the study's privacy setting and
        # release exact evaluation aggregates, as before (the study's owner holds their data anyway)
        policy = SitePolicyConfig(required=False, evaluation=EvaluationPolicyConfig(release="exact"))
        # and take the work the study itself asks of them (its local epochs, fine-tuning, views)
        default = RoundLimitsConfig()
        limits = RoundLimitsConfig(
            max_local_epochs=max(
                default.max_local_epochs, study.train.local_epochs, study.study.fine_tune_epochs
            ),
            max_augment_views=max(default.max_augment_views, study.train.augment_views),
            max_step_images=max(default.max_step_images, study.train.batch_size * study.train.augment_views),
        )
        sites.append(SiteConfig(site=name, data=data, privacy=policy, limits=limits))
    return sites
