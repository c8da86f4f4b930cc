"""Finding checkpoints on disk: a run folder's latest one, or a folder the user points at."""

from __future__ import annotations

import json
from pathlib import Path

STATE_FILE = "trainer_state.json"
WEIGHTS_DIR = "weights"


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The checkpoint with the highest step under a Ray Train run folder (``runs/NAME``)."""
    run_dir = Path(run_dir)
    found = [p for p in run_dir.glob("checkpoint_*") if (p / STATE_FILE).is_file()]
    if not found:
        raise FileNotFoundError(f"{run_dir}: no finished checkpoint (checkpoint_*/{STATE_FILE}); train first")
    return max(found, key=lambda p: json.loads((p / STATE_FILE).read_text())["step"])


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (its latest checkpoint), as an absolute path."""
    path = Path(path).resolve()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint or run folder")
    if (path / WEIGHTS_DIR).is_dir() or (path / "config.json").is_file() or not any(path.glob("checkpoint_*")):
        return path
    return latest_checkpoint(path)


def weights_dir(path: str | Path) -> Path:
    """The serving weights of a checkpoint folder (its ``weights/``), or a weights folder itself."""
    path = Path(path)
    return path / WEIGHTS_DIR if (path / WEIGHTS_DIR).is_dir() else path
