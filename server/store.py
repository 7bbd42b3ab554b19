"""What the coordinator writes in a run folder: results.json, checkpoints, the final model, the log.

Every file is written to a temporary name and renamed, so a crash never leaves a half-written
results.json or checkpoint behind; the two newest checkpoints are kept.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch

CHECKPOINTS_KEPT = 2


def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _clean(obj):
    """JSON-safe: NaN and infinities become null (results.json is read by other tools)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


class RunStore:
    def __init__(self, out_dir: str | Path):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "checkpoints").mkdir(exist_ok=True)

    @property
    def results_path(self) -> Path:
        return self.dir / "results.json"

    @property
    def final_model_path(self) -> Path:
        return self.dir / "final_model.pt"

    @property
    def log_path(self) -> Path:
        return self.dir / "fedward.log"

    def write_results(self, results: dict) -> None:
        text = json.dumps(_clean(results), indent=2, allow_nan=False)
        _atomic_write_bytes(self.results_path, lambda p: p.write_text(text))

    def checkpoints(self) -> list[Path]:
        return sorted((self.dir / "checkpoints").glob("round-*.pt"))

    def save_checkpoint(self, round_: int, state: dict) -> Path:
        path = self.dir / "checkpoints" / f"round-{round_:04d}.pt"
        _atomic_write_bytes(path, lambda p: torch.save(state, p))
        for old in self.checkpoints()[:-CHECKPOINTS_KEPT]:
            old.unlink(missing_ok=True)
        return path

    def load_latest_checkpoint(self) -> dict | None:
        paths = self.checkpoints()
        return torch.load(paths[-1], map_location="cpu", weights_only=False) if paths else None

    def attach_log(self) -> logging.Handler:
        handler = logging.FileHandler(self.log_path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        for name in ("fedward", "flwr"):
            logging.getLogger(name).addHandler(handler)
        logging.getLogger("fedward").setLevel(logging.INFO)
        return handler

    @staticmethod
    def detach_log(handler: logging.Handler) -> None:
        for name in ("fedward", "flwr"):
            logging.getLogger(name).removeHandler(handler)
        handler.close()
