"""What a site trained on, kept at the site: the reference that drift monitoring compares new data with.

The first time a site trains in a study it keeps, in `<state_dir>/profiles/`, each training image's
intensity features and acquisition facts (common.sitedata: manufacturer, model, kVp, photometric
interpretation, date, modality, pixel spacing), the training labels' class counts, and a sample of at
most `SAMPLE` of its test images (never trained on) with their labels, on which `fedward site monitor`
(client.monitor) computes the package's prediction distribution. It stays in the site's private state
folder, like the site's image cache: nothing of it leaves the site.

What the site trained on is the same in every study until its data changes, and the study id is the
coordinator's word, so the profile is kept once per state of the data, `data/<digest>.npz` (named by
a SHA-256 of its contents), and each study gets a small record naming it, `<study id>.json`: a
coordinator that sends a new study id with every round adds one small file a study, not another copy
of the test sample (tens to hundreds of MB at clinical image sizes). A profile written before, one
`<study id>.npz` holding all of it, is still read.

    profile = load_profile(state_dir, study_id)   # None when the site did not train in that study
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import torch

from common.files import name_from_id, write_atomic
from common.sitedata import SiteData

log = logging.getLogger("fedward.site")
PROFILES_DIR = "profiles"
DATA_DIR = "data"  # inside PROFILES_DIR: one profile per state of the site's data, named by its digest
SAMPLE = 300  # test images kept for the prediction distribution
INTENSITY_FEATURES = ("intensity_mean", "intensity_std", "intensity_p05", "intensity_p50", "intensity_p95")


def intensity_features(x: torch.Tensor) -> dict[str, np.ndarray]:
    """Per image (N x C x ...): the mean, standard deviation and 5th/50th/95th percentiles of its values."""
    flat = x.reshape(len(x), -1).double()
    if len(flat) == 0:
        return {k: np.zeros(0) for k in INTENSITY_FEATURES}
    q = torch.quantile(flat, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64), dim=1)
    values = (flat.mean(1), flat.std(1), q[0], q[1], q[2])
    return {k: v.numpy() for k, v in zip(INTENSITY_FEATURES, values, strict=True)}


def profile_of(x: torch.Tensor, y: torch.Tensor, acquisition: list[dict] | None, classes: list[str]) -> dict:
    """The features of images x (labels y): intensity per image, acquisition facts, class counts."""
    labels = y.numpy()
    counts = np.bincount(labels.ravel() if labels.ndim == 1 else (labels.reshape(len(labels), -1).max(1) > 0),
                         minlength=len(classes) if labels.ndim == 1 else 2)  # fmt: skip
    return {
        "intensity": intensity_features(x),
        "acquisition": list(acquisition) if acquisition is not None else [],
        "class_counts": counts.astype(np.int64),
        "n": int(len(x)),
    }


def profile_path(state_dir: str | Path, study_id: str) -> Path:
    """The study's record: `<study id>.json`, naming the data profile it trained on."""
    return _folder(state_dir) / f"{name_from_id(study_id)}.json"


def _folder(state_dir: str | Path) -> Path:
    return Path(state_dir).expanduser() / PROFILES_DIR


def _legacy_path(state_dir: str | Path, study_id: str) -> Path:
    """A study's whole profile as it was kept before the data profiles were shared."""
    return _folder(state_dir) / f"{name_from_id(study_id)}.npz"


def _kept_profile(state_dir: str | Path, study_id: str) -> Path | None:
    """The file holding the profile kept for `study_id`: the data profile its record names, else a
    profile kept whole by an earlier version; None when there is none to read (no record, a record
    that cannot be read or is another study's, or a data profile no longer there: the study's next
    round keeps it again)."""
    try:
        record = json.loads(profile_path(state_dir, study_id).read_text())
        if record["study_id"] == study_id:  # two ids can share a file name (name_from_id)
            path = _folder(state_dir) / DATA_DIR / Path(record["data"]).name
            return path if path.is_file() else None
    except (OSError, ValueError, KeyError, TypeError):
        pass
    legacy = _legacy_path(state_dir, study_id)
    return legacy if legacy.is_file() else None


def record_training_profile(state_dir: str | Path | None, study_id: str, data: SiteData) -> Path | None:
    """Keep the study's reference profile once (see the module docstring): the data profile if no
    study kept the same one, and the study's record naming it. Returns the file holding the profile;
    None without a state_dir or a study id, or when a write failed (logged; the training goes on)."""
    if not state_dir or not study_id:
        return None
    if kept := _kept_profile(state_dir, study_id):
        return kept
    path = profile_path(state_dir, study_id)
    train = profile_of(data.train_x, data.train_y, (data.acquisition or {}).get("train"), data.classes)
    keep = np.random.default_rng(0).permutation(len(data.test_x))[:SAMPLE]
    meta = {
        "site": data.site,
        "classes": data.classes,
        "n_train": train["n"],
        "acquisition": train["acquisition"],
    }
    arrays = {f"train_{k}": v for k, v in train["intensity"].items()}
    arrays |= {"train_class_counts": train["class_counts"], "sample_x": data.test_x[keep].to(torch.float16).numpy(),
               "sample_y": data.test_y[keep].numpy(), "meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)}  # fmt: skip
    snapshot = _folder(state_dir) / DATA_DIR / f"{_digest(arrays)}.npz"
    try:
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        if not snapshot.exists():
            buffer = io.BytesIO()
            np.savez_compressed(buffer, **arrays)
            write_atomic(snapshot, buffer.getvalue())
        write_atomic(path, json.dumps({"study_id": study_id, "data": snapshot.name}).encode())
    except OSError as err:
        log.warning("site '%s': could not keep its training profile at %s (%s); drift monitoring of this "
                    "study will need --reference", data.site, path, err)  # fmt: skip
        return None
    return snapshot


def _digest(arrays: dict[str, np.ndarray]) -> str:
    """A SHA-256 of the arrays' names, types, shapes and values (the first 16 hex digits)."""
    sha = hashlib.sha256()
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        sha.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
        sha.update(value.tobytes())
    return sha.hexdigest()[:16]


def load_profile(state_dir: str | Path, study_id: str) -> dict | None:
    """The reference profile the site kept for `study_id` (record_training_profile), or None."""
    path = _kept_profile(state_dir, study_id)
    if path is None:
        return None
    with np.load(path) as z:
        meta = json.loads(bytes(z["meta"]).decode()) | {"study_id": study_id}
        return {
            "meta": meta,
            "intensity": {k: z[f"train_{k}"] for k in INTENSITY_FEATURES},
            "acquisition": meta["acquisition"],
            "class_counts": z["train_class_counts"],
            "sample_x": torch.from_numpy(z["sample_x"].astype(np.float32)),
            "sample_y": torch.from_numpy(z["sample_y"]),
            "path": str(path),
        }
