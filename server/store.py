"""What the coordinator writes in a run folder: results.json, checkpoints, the final model, the log.

Every file is written to a temporary name, flushed and renamed (common.files), so a crash never
leaves a half-written results.json or checkpoint behind; the two newest checkpoints are kept, and a
newest checkpoint that cannot be read (a damaged disk, a copy cut short, or one holding more than
tensors, numbers, text and arrays: it is read without running code) falls back to the one before,
with a warning.
"""

from __future__ import annotations

import io
import logging
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch

from common.files import write_atomic
from server.run_folder import CHECKPOINTS_DIR, FINAL_MODEL_FILE, LOG_FILE, RESULTS_FILE, write_json

log = logging.getLogger("fedward.run")

CHECKPOINTS_KEPT = 2
# What a checkpoint holds besides tensors and plain values: the strategy's numpy arrays (FedAdam's
# moments, SCAFFOLD's controls). A checkpoint is loaded without running any code it may carry
# (weights_only), so a run folder copied from elsewhere cannot run code on `--resume`: a checkpoint
# holding anything else is passed over as unreadable.
NUMPY_ARRAYS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.Float32DType,
                np.dtypes.Float64DType, np.dtypes.Float16DType, np.dtypes.Int64DType, np.dtypes.Int32DType,
                np.dtypes.BoolDType]  # fmt: skip


class RunStore:
    def __init__(self, out_dir: str | Path):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / CHECKPOINTS_DIR).mkdir(exist_ok=True)

    @property
    def results_path(self) -> Path:
        return self.dir / RESULTS_FILE

    @property
    def final_model_path(self) -> Path:
        return self.dir / FINAL_MODEL_FILE

    @property
    def log_path(self) -> Path:
        return self.dir / LOG_FILE

    def write_results(self, results: dict) -> None:
        write_json(self.results_path, results)

    def checkpoints(self) -> list[Path]:
        return sorted((self.dir / CHECKPOINTS_DIR).glob("round-*.pt"))

    def save_checkpoint(self, round_: int, state: dict) -> Path:
        path = self.dir / CHECKPOINTS_DIR / f"round-{round_:04d}.pt"
        buffer = io.BytesIO()  # serialized first: a full disk then fails as an OSError naming the path
        torch.save(state, buffer)
        write_atomic(path, buffer.getvalue())
        for old in self.checkpoints()[:-CHECKPOINTS_KEPT]:
            old.unlink(missing_ok=True)
        return path

    def load_latest_checkpoint(self) -> dict | None:
        """The newest checkpoint that can be read (None when there is none); a damaged newer one is
        passed over with a warning naming it, and left where it is."""
        for path in reversed(self.checkpoints()):
            try:
                with torch.serialization.safe_globals(NUMPY_ARRAYS):  # tensors, numbers, text, arrays
                    state = torch.load(path, map_location="cpu", weights_only=True)
                if not isinstance(state, dict) or "round" not in state:
                    raise ValueError("not a fedward checkpoint")
                return state
            except (
                OSError,
                RuntimeError,
                ValueError,
                EOFError,
                pickle.UnpicklingError,
                zipfile.BadZipFile,
            ) as err:
                log.warning("checkpoint %s cannot be read (%s); falling back to the one before it", path, err)
        return None

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
