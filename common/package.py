"""A model package: what a hospital needs to use a federated model, loadable without running code.

    DIR/model/weights.safetensors   the weights (safetensors: tensors only, nothing to unpickle)
    DIR/model/package.json          classes, input, preprocessing, operating point, per-site performance,
                                    privacy spent, training data per site, the study config
    DIR/model/MODEL_CARD.md, model_card.html   the model card (server.model_card)

`load_package(path)` checks the JSON's kind and version and the weights' names and shapes against
the model it describes; anything else (another fedward version, a damaged or foreign file) raises
PackageError naming the file and what to do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.files import write_atomic

if TYPE_CHECKING:
    from torch import nn

# torch, safetensors and the model zoo are imported where weights are written or read, so that the
# package's file names below cost a command like `fedward --help` nothing

PACKAGE_DIR = "model"
WEIGHTS_FILE = "weights.safetensors"
META_FILE = "package.json"
CARD_MD = "MODEL_CARD.md"
CARD_HTML = "model_card.html"
PACKAGE_KIND = "fedward-model"
PACKAGE_VERSION = 1
MAX_CLASSES = 1000  # a package naming more is refused before its model is built


class PackageError(Exception):
    """A model package that cannot be used: missing, damaged, foreign, or of another version."""


def write_package(folder: str | Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write `model`'s weights and `meta` (see the module docstring) into `folder`; returns it."""
    from safetensors.torch import save as save_safetensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomic(folder / WEIGHTS_FILE, save_safetensors(state))
    doc = {"kind": PACKAGE_KIND, "version": PACKAGE_VERSION, **meta}
    write_atomic(folder / META_FILE, json.dumps(doc, indent=2, allow_nan=False, default=_plain))
    return folder


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON")


def package_folder(path: str | Path) -> Path:
    """The package folder for `path`: the folder itself, its `model/`, or the folder of package.json."""
    p = Path(path)
    if p.is_file():
        return p.parent
    return p / PACKAGE_DIR if (p / PACKAGE_DIR / META_FILE).exists() else p


def read_meta(path: str | Path) -> dict[str, Any]:
    folder = package_folder(path)
    meta_path = folder / META_FILE
    try:
        doc = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise PackageError(
            f"'{path}' is not a fedward model package (no {META_FILE}); give the folder a study wrote "
            f"(its {PACKAGE_DIR}/ folder) or that folder's {META_FILE}."
        ) from None
    except (OSError, ValueError) as err:
        raise PackageError(f"'{meta_path}' cannot be read as JSON ({err}); copy the package again.") from err
    if not isinstance(doc, dict) or doc.get("kind") != PACKAGE_KIND:
        raise PackageError(
            f"'{meta_path}' is not a fedward model package (its kind is not '{PACKAGE_KIND}')."
        )
    if doc.get("version") != PACKAGE_VERSION:
        raise PackageError(
            f"'{meta_path}' is a package of format version {doc.get('version')}; this fedward reads version "
            f"{PACKAGE_VERSION}: use the fedward version that wrote it, or export the model again."
        )
    for key in ("model", "classes", "in_channels"):
        if key not in doc:
            raise PackageError(f"'{meta_path}' lacks '{key}'; the package is damaged: copy it again.")
    _check_model(doc, meta_path)
    return doc


def _check_model(doc: dict[str, Any], meta_path: Path) -> None:
    """The network package.json describes is one fedward builds, of a size it can build (before any
    weight is allocated: a package is the coordinator's word), and its input settings are readable."""
    from common.config import preprocess_config
    from common.schema import MODEL_NAMES, ConfigError

    def wrong(what: str) -> PackageError:
        return PackageError(f"'{meta_path}': {what}; the package is damaged or not fedward's: copy it again.")

    if doc["model"] not in MODEL_NAMES:
        raise wrong(f"'model' is {doc['model']!r}, not a network fedward builds ({', '.join(MODEL_NAMES)})")
    if doc["in_channels"] not in (1, 3) or isinstance(doc["in_channels"], bool):
        raise wrong(f"'in_channels' is {doc['in_channels']!r}; fedward's models take 1 or 3")
    classes = doc["classes"]
    if (
        not isinstance(classes, list)
        or not 2 <= len(classes) <= MAX_CLASSES
        or not all(isinstance(c, str) for c in classes)
        or len(set(classes)) != len(classes)
    ):
        raise wrong(f"'classes' must list 2 to {MAX_CLASSES} different names, got {str(classes)[:200]}")
    reading = doc.get("input", {})
    if not isinstance(reading, dict) or not isinstance(reading.get("sites", {}), dict):
        raise wrong("'input' must be a mapping with 'sites' a mapping of site names")
    settings = [("input.preprocess", reading.get("preprocess", {}))]
    settings += [(f"input.sites.{site}.preprocess", s.get("preprocess", {}) if isinstance(s, dict) else s)
                 for site, s in reading.get("sites", {}).items()]  # fmt: skip
    for where, preprocess in settings:
        try:
            preprocess_config(preprocess, where, str(meta_path))
        except ConfigError as err:
            raise PackageError(f"{err} The package is damaged or not fedward's: copy it again.") from None


def load_package(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """(the model in eval mode, package.json's dict); raises PackageError naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    from common.models import build_model

    meta = read_meta(path)
    weights = package_folder(path) / WEIGHTS_FILE
    try:
        state = load_safetensors(weights.read_bytes())
    except (OSError, SafetensorError) as err:
        raise PackageError(
            f"'{weights}' cannot be read as safetensors weights ({err}); copy the package again."
        ) from err
    model = build_model(meta["model"], in_channels=int(meta["in_channels"]), num_classes=len(meta["classes"]))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        wrong = sorted(set(expected) ^ set(got)) or sorted(k for k in expected if expected[k] != got[k])
        raise PackageError(
            f"'{weights}' does not hold the weights of a {meta['model']} with {len(meta['classes'])} classes "
            f"(differs in {wrong[:3]}); the package is damaged or mixed from two: copy it again."
        )
    model.load_state_dict(state)
    return model.eval(), meta


def package_identity(path: str | Path, meta: dict[str, Any]) -> dict[str, Any]:
    """What names a package: where it lies, its weights' SHA-256, the study and round that made it."""
    import hashlib

    folder = package_folder(path)
    study = meta.get("study", {})
    return {
        "package": str(folder),
        "sha256": hashlib.sha256((folder / WEIGHTS_FILE).read_bytes()).hexdigest(),
        "study_id": study.get("id"),
        "study_name": study.get("name"),
        "round": meta.get("performance", {}).get("round"),
        "model": meta.get("model"),
    }


def package_labels(packages: list[tuple[str | Path, dict[str, Any]]]) -> list[str]:
    """A short, unique name per (path, meta): the study that made it (its run folder's name when
    that repeats)."""
    folders = [package_folder(p) for p, _ in packages]
    names = [
        meta.get("study", {}).get("name") or f.parent.name
        for f, (_, meta) in zip(folders, packages, strict=True)
    ]
    out: list[str] = []
    for i, name in enumerate(names):
        label = name if names.count(name) == 1 else f"{name} ({folders[i].parent.name})"
        out.append(label if label not in out else f"{label} #{i + 1}")
    return out
