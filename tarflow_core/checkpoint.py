"""Checkpoints: weights as safetensors, optimiser and schedule through weights-only loading.

Every file is written to a temporary name and renamed into place, so a crash mid-write leaves
the previous checkpoint intact.
"""

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from tarflow_core.errors import TarflowError

WEIGHTS = "model.safetensors"
TRAINER_STATE = "trainer_state.pt"
META = "checkpoint.json"


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save(folder: Path, model, optimizer=None, scheduler=None, step: int = 0, extra=None) -> None:
    folder.mkdir(parents=True, exist_ok=True)

    # The tied decoder shares the encoder's tensors; save_model stores shared tensors once.
    _atomic(folder / WEIGHTS, lambda p: save_model(model, str(p)))
    if optimizer is not None:
        state = {"optimizer": optimizer.state_dict(), "step": step}
        if scheduler is not None:
            state["scheduler"] = scheduler.state_dict()
        _atomic(folder / TRAINER_STATE, lambda p: torch.save(state, p))
    meta = {"step": step, **(extra or {})}
    _atomic(folder / META, lambda p: p.write_text(json.dumps(meta, indent=2)))


def load_weights(folder: Path, model) -> dict:
    """Load weights into `model`; return the checkpoint's metadata."""
    weights = folder / WEIGHTS
    if not weights.exists():
        raise TarflowError(f"no checkpoint at {str(folder)!r}", hint=f"expected {WEIGHTS} there")
    try:
        load_model(model, str(weights), strict=True)
    except Exception as error:  # truncated file, foreign file or another architecture
        raise TarflowError(
            f"checkpoint {str(weights)!r} does not fit this model: {error}",
            hint="load it with the operative config saved beside it",
        ) from None
    meta_path = folder / META
    return json.loads(meta_path.read_text()) if meta_path.exists() else {}
