"""A checkpoint folder on disk, shared by training (resume), publishing and serving: its layout, whether it is
complete, the newest complete one of a run folder, and where its serving weights are."""

from __future__ import annotations

import json
from pathlib import Path

STATE_FILE = "trainer_state.json"
WEIGHTS_DIR = "weights"


def rank_marker(rank: int) -> str:
    """The empty file each training rank adds to a checkpoint it wrote its state into."""
    return f"rank-{rank}.done"


def checkpoint_step(path: str | Path) -> int:
    return int(json.loads((Path(path) / STATE_FILE).read_text())["step"])


def is_complete(path: Path) -> bool:
    """Rank 0's state file is there and every rank of the run that wrote it left its marker."""
    state_file = path / STATE_FILE
    if not state_file.is_file():
        return False
    world = json.loads(state_file.read_text()).get("world")
    return world is None or all((path / rank_marker(r)).is_file() for r in range(world))


def newest_complete(run_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under a run folder (``runs/NAME``), if any."""
    run_dir = Path(run_dir)
    found = [p for p in run_dir.glob("checkpoint_*") if is_complete(p)] if run_dir.is_dir() else []
    return max(found, key=checkpoint_step) if found else None


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The checkpoint with the highest step under a Ray Train run folder (``runs/NAME``)."""
    found = newest_complete(run_dir)
    if found is None:
        raise FileNotFoundError(f"{run_dir}: no finished checkpoint (checkpoint_*/{STATE_FILE}); train first")
    return found


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
