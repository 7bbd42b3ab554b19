"""The coordinator's run folder read back: a checkpoint or final model that carries code is not run.

A run folder can come from elsewhere (a colleague's copy, a shared drive) and `--resume` reads its
newest checkpoint; a pickle runs whatever it names on loading. Checkpoints and models are read with
torch's weights_only loader (tensors, numbers, text, and the strategy's numpy arrays), and a
checkpoint that holds anything else is passed over like a damaged one."""

from __future__ import annotations

import logging
import pathlib
import pickle

import numpy as np
import pytest
import torch

from common.models import build_model, load_model, save_model
from server.run_folder import CHECKPOINTS_DIR
from server.store import RunStore


class RunsCodeWhenLoaded:
    """Pickled as a call of pathlib.Path.touch: loading it the old way makes the marker file."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_a_checkpoint_carrying_code_is_passed_over_and_its_code_never_runs(tmp_path, caplog):
    store = RunStore(tmp_path / "run")
    moments = {"conv.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}  # FedAdam's m_t, as saved
    store.save_checkpoint(1, {"round": 1, "arrays": {"w": torch.ones(2)}, "strategy_state": {"m_t": moments},
                              "python_rng": (3, tuple(range(5)), None), "results": {"status": "running"}})  # fmt: skip
    marker = tmp_path / "code-ran"
    torch.save(
        {"round": 2, "payload": RunsCodeWhenLoaded(marker)}, store.dir / CHECKPOINTS_DIR / "round-0002.pt"
    )

    with caplog.at_level(logging.WARNING, logger="fedward.run"):
        state = store.load_latest_checkpoint()

    assert not marker.exists()
    assert state["round"] == 1 and np.array_equal(
        state["strategy_state"]["m_t"]["conv.weight"], moments["conv.weight"]
    )
    assert "round-0002.pt cannot be read" in caplog.text


def test_a_final_model_carrying_code_is_refused_and_its_code_never_runs(tmp_path):
    model = build_model("cnn28", num_classes=2)
    save_model(
        tmp_path / "final_model.pt", model, meta={"model": "cnn28", "in_channels": 1, "num_classes": 2}
    )
    loaded, meta = load_model(tmp_path / "final_model.pt")
    assert meta["model"] == "cnn28" and all(
        torch.equal(a, b)
        for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True)
    )
    marker = tmp_path / "code-ran"
    # written as someone else's file would be (save_model itself keeps only plain values)
    torch.save({"state_dict": model.state_dict(), "model": "cnn28", "in_channels": 1, "num_classes": 2,
                "note": RunsCodeWhenLoaded(marker)}, tmp_path / "carrying.pt")  # fmt: skip
    with pytest.raises(pickle.UnpicklingError):
        load_model(tmp_path / "carrying.pt")
    assert not marker.exists()
