"""Checkpoints that survive a kill at any moment, and refuse to load when they do not fit.

A checkpoint is a folder: the weights as safetensors, the trainer state (optimiser, schedule,
random states, data position) as tensors and plain values loaded with `weights_only`, and a
manifest, `checkpoint.json`, written last, that records the format, the step, the size and
SHA-256 of every file, and the shape of every parameter.

A new checkpoint is written whole into a sibling folder and then renamed into place; the old
one is moved aside first and deleted last. A kill at any point leaves at least one folder whose
manifest matches its files, and `find` picks the newest such folder.
"""

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from tarflow_core.errors import CheckpointError

logger = logging.getLogger(__name__)

FORMAT = "tarflow-checkpoint/1"
WEIGHTS = "model.safetensors"
TRAINER_STATE = "trainer_state.pt"
META = "checkpoint.json"  # the manifest
DAMAGED_HINT = "it was cut short or changed after it was written: copy it again, or train afresh"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as file:
        os.fsync(file.fileno())


def _fsync_dir(path: Path) -> None:
    # Directory entries (renames) reach the disk only when the directory itself is synced.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write) -> None:
    """Write a file through `write(tmp_path)`, sync it, and rename it over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda p: p.write_text(text))


def _siblings(folder: Path) -> tuple[Path, Path]:
    """Where a checkpoint is built before it replaces `folder`, and where the old one waits."""
    return (
        folder.with_name(f".{folder.name}.partial"),
        folder.with_name(f".{folder.name}.previous"),
    )


def parameter_shapes(model) -> dict[str, list[int]]:
    """The shape of every tensor of a model's state, by name: what a checkpoint must match."""
    return {name: list(t.shape) for name, t in model.state_dict().items()}


def save(folder: Path, model, step: int = 0, trainer_state=None, extra=None) -> None:
    """Write a checkpoint of `model` (and, for resuming, `trainer_state`) as `folder`.

    Args:
        trainer_state: a nest of dicts, lists, tensors and plain values; None for weights only.
        extra: more JSON-able metadata for the manifest.
    """
    folder = Path(folder)
    partial, previous = _siblings(folder)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)

    # The tied decoder shares the encoder's tensors; save_model stores shared tensors once.
    save_model(model, str(partial / WEIGHTS))
    files = [WEIGHTS]
    if trainer_state is not None:
        torch.save(trainer_state, partial / TRAINER_STATE)
        files.append(TRAINER_STATE)
    for name in files:
        _fsync_file(partial / name)
    manifest = {
        "format": FORMAT,
        "step": step,
        "files": {
            n: {"bytes": (partial / n).stat().st_size, "sha256": _sha256(partial / n)}
            for n in files
        },
        "parameters": parameter_shapes(model),
        **(extra or {}),
    }
    write_text_atomic(partial / META, json.dumps(manifest, indent=2))
    _fsync_dir(partial)

    # The switch: between the two renames `folder` is briefly absent, and `find` falls back
    # on the complete partial folder or the previous one.
    shutil.rmtree(previous, ignore_errors=True)
    if folder.exists():
        os.replace(folder, previous)
    os.replace(partial, folder)
    _fsync_dir(folder.parent)
    shutil.rmtree(previous, ignore_errors=True)


def _is_legacy(manifest) -> bool:
    """Checkpoints of the first releases: `{"step": N}` beside the weights, nothing more."""
    return isinstance(manifest, dict) and "format" not in manifest and "step" in manifest


def read_manifest(folder: Path, allow_legacy: bool = False) -> dict:
    """The manifest of a checkpoint folder, after checking every file against it.

    With `allow_legacy`, a checkpoint written before manifests existed is let through with
    its files unchecked; it can give weights, not a resumable training state.
    """
    folder = Path(folder)
    meta_path = folder / META
    if not meta_path.exists():
        if (folder / WEIGHTS).exists():
            raise CheckpointError(
                f"{str(folder)!r} has weights but no manifest ({META}): it is not a complete "
                "tarflow checkpoint",
                hint=DAMAGED_HINT,
            )
        raise CheckpointError(f"no checkpoint at {str(folder)!r}", hint=f"expected {META} there")
    try:
        manifest = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(
            f"the manifest {str(meta_path)!r} is not JSON", hint=DAMAGED_HINT
        ) from None
    if allow_legacy and _is_legacy(manifest):
        logger.warning("%s predates checkpoint manifests; its files are not checked", folder)
        return {**manifest, "files": {}, "legacy": True}
    if _is_legacy(manifest):
        raise CheckpointError(
            f"{str(folder)!r} was written by an older tarflow: it holds weights but not the "
            "state needed to resume training",
            hint="load its weights with checkpoint.load_weights, or start a new run",
        )
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise CheckpointError(
            f"{str(folder)!r} is not a tarflow checkpoint (format {found!r}, expected {FORMAT!r})",
            hint="point at the 'checkpoint' folder of a tarflow run",
        )
    for name, expected in manifest["files"].items():
        path = folder / name
        if not path.exists():
            raise CheckpointError(
                f"checkpoint {str(folder)!r} is missing {name}", hint=DAMAGED_HINT
            )
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(
                f"checkpoint file {str(path)!r} is truncated or damaged: {size} bytes, the "
                f"manifest says {expected['bytes']}",
                hint=DAMAGED_HINT,
            )
        if _sha256(path) != expected["sha256"]:
            raise CheckpointError(
                f"checkpoint file {str(path)!r} is damaged: its SHA-256 differs from the "
                "manifest's",
                hint=DAMAGED_HINT,
            )
    return manifest


def check_shapes(manifest: dict, model, folder: Path) -> None:
    """Refuse a checkpoint whose tensors are not this model's, naming the first difference."""
    saved, here = manifest.get("parameters", {}), parameter_shapes(model)
    missing = sorted(set(here) - set(saved))
    unexpected = sorted(set(saved) - set(here))
    changed = sorted(n for n in set(here) & set(saved) if here[n] != saved[n])
    if not (missing or unexpected or changed):
        return
    if changed:
        name = changed[0]
        detail = f"{name!r} has shape {tuple(saved[name])} there and {tuple(here[name])} here"
    elif missing:
        detail = f"{len(missing)} tensors of this model are not in it, e.g. {missing[0]!r}"
    else:
        detail = f"it holds {len(unexpected)} tensors this model lacks, e.g. {unexpected[0]!r}"
    raise CheckpointError(
        f"checkpoint {str(folder)!r} was written by a different model: {detail}",
        hint="build the model with the operative_config.gin saved in the run folder",
    )


def load_weights(folder: Path, model) -> dict:
    """Load weights into `model`; return the checkpoint's manifest.

    Refuses, with a CheckpointError saying why, a folder that is missing, incomplete,
    damaged, not a tarflow checkpoint, or written by a model of another shape.
    """
    folder = Path(folder)
    if not (folder / META).exists():
        # A kill between the two renames of a save leaves the checkpoint under another name.
        folder = find(folder) or folder
    manifest = read_manifest(folder, allow_legacy=True)
    if not manifest.get("legacy"):
        check_shapes(manifest, model, folder)
    try:
        load_model(model, str(folder / WEIGHTS), strict=True)
    except (SafetensorError, RuntimeError, OSError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise CheckpointError(
            f"checkpoint {str(folder / WEIGHTS)!r} does not fit this model: {first[:200]}",
            hint="load it with the operative config saved beside it",
        ) from None
    return manifest


def load_trainer_state(folder: Path) -> dict:
    """The trainer state of a checkpoint, loaded without unpickling code."""
    path = Path(folder) / TRAINER_STATE
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {str(folder)!r} holds weights only and cannot resume training",
            hint="load it with checkpoint.load_weights, or train afresh",
        )
    try:
        return torch.load(path, weights_only=True)
    except Exception as error:  # the unpickler refuses anything but tensors and plain values
        raise CheckpointError(
            f"trainer state {str(path)!r} cannot be loaded safely: {type(error).__name__}",
            hint=DAMAGED_HINT,
        ) from None


def find(folder: Path) -> Path | None:
    """The newest complete checkpoint among `folder` and what an interrupted save left beside
    it, or None when there is none. Damaged candidates are skipped with a warning."""
    folder = Path(folder)
    best, best_step = None, -1
    for candidate in (folder, *_siblings(folder)):
        if not candidate.exists():
            continue
        try:
            step = read_manifest(candidate)["step"]
        except CheckpointError as error:
            # A partial folder without a manifest is an ordinary interrupted save.
            if candidate == folder or (candidate / META).exists():
                logger.warning("skipping %s: %s", candidate, error.one_line())
            continue
        if step > best_step:
            best, best_step = candidate, step
    return best


def recover(folder: Path) -> Path | None:
    """Put the newest complete checkpoint in place as `folder` after an interrupted save, and
    clear what the save left behind. Returns `folder`, or None when no checkpoint is usable."""
    folder = Path(folder)
    best = find(folder)
    if best is not None and best != folder:
        logger.warning("an interrupted save left %s; using it as %s", best.name, folder.name)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(best, folder)
        _fsync_dir(folder.parent)
    for leftover in _siblings(folder):
        shutil.rmtree(leftover, ignore_errors=True)
    return folder if best is not None else None
