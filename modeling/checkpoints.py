"""A checkpoint folder on disk, shared by training (resume), publishing and serving: its layout, whether it is
intact, the newest intact one of a run folder, and where its serving weights are.

A checkpoint is written by every training rank (DeepSpeed state, a ``rank-N.done`` marker), rank 0 adds the
serving weights and ``trainer_state.json``, and once every rank's files are in the run folder rank 0 writes
``manifest.json`` last and atomically: the relative name, size and sha256 of every other file. A checkpoint
whose state says it ends with a manifest is complete only when the manifest is there and every file it lists
has its size (``is_complete``) or also its checksum (``verify(path, deep=True)``). Checkpoints written before
manifests existed keep the older rule: rank 0's state file and every rank's marker.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

STATE_FILE = "trainer_state.json"
WEIGHTS_DIR = "weights"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1  # trainer_state.json's "manifest": this checkpoint is complete only with a manifest of it


class DamagedCheckpoint(ValueError):
    """A checkpoint that is unfinished or whose files are not the ones its manifest lists."""


def rank_marker(rank: int) -> str:
    """The empty file each training rank adds to a checkpoint it wrote its state into."""
    return f"rank-{rank}.done"


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:06d}"


def checkpoint_step(path: str | Path) -> int:
    return int(json.loads((Path(path) / STATE_FILE).read_text())["step"])


def file_records(directory: str | Path) -> list[dict]:
    """Name (relative, POSIX), size and sha256 of every file under ``directory``: one rank's part of a manifest."""
    directory = Path(directory)
    return [
        {"name": path.relative_to(directory).as_posix(), "size": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    ]


def write_manifest(path: str | Path, records: list[dict]) -> Path:
    """The manifest of a checkpoint whose files are all in place, written atomically (tmp + rename).

    Refuses to write it when a listed file is missing or has another size than recorded: a copy into the run
    folder that lost bytes must leave the checkpoint incomplete, not certify it."""
    path = Path(path)
    for record in records:
        problem = _size_problem(path, record)
        if problem:
            raise DamagedCheckpoint(f"{path.name}: {problem}; no manifest written")
    manifest = {"format": MANIFEST_FORMAT, "files": sorted(records, key=lambda r: r["name"])}
    with no_space_left(path):
        return _write_atomically(path / MANIFEST_FILE, json.dumps(manifest))


class NoSpaceLeft(OSError):
    """A checkpoint write that found its disk full, named by the folder it was writing."""


@contextmanager
def no_space_left(path: str | Path):
    """Turns a full disk (ENOSPC) inside the block into one line naming ``path``."""
    try:
        yield
    except NoSpaceLeft:
        raise
    except OSError as error:
        if error.errno == errno.ENOSPC or "No space left" in str(error):
            raise NoSpaceLeft(errno.ENOSPC, f"no space left on {path}") from error
        raise


def _write_atomically(target: Path, text: str) -> Path:
    """Readers see the old file or the whole new one, never a part of it."""
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def damage(path: str | Path, deep: bool = False) -> str | None:
    """Why the checkpoint at ``path`` is not usable (one line, naming the file), or None when it is intact.
    Sizes are always checked; ``deep`` also compares every file's sha256 with the manifest."""
    path = Path(path)
    if not path.is_dir():
        return "no such folder"
    state_file = path / STATE_FILE
    if not state_file.is_file():
        return f"no {STATE_FILE} (the save never finished)"
    try:
        state = json.loads(state_file.read_text())
        int(state["step"])
    except (ValueError, KeyError, TypeError):
        return f"{STATE_FILE} is not a trainer state (empty or garbled)"
    if "manifest" not in state:  # written before manifests: every rank's marker is the only evidence
        missing = [r for r in range(state.get("world") or 0) if not (path / rank_marker(r)).is_file()]
        return f"rank {missing[0]} never finished (no {rank_marker(missing[0])})" if missing else None
    manifest_file = path / MANIFEST_FILE
    if not manifest_file.is_file():
        return f"no {MANIFEST_FILE} (the save never finished)"
    try:
        records = json.loads(manifest_file.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST_FILE} is not a manifest (empty or garbled)"
    for record in records:
        problem = _size_problem(path, record)
        if problem:
            return problem
    if deep:
        for record in records:
            if _sha256(path / record["name"]) != record["sha256"]:
                return f"{record['name']} does not match its sha256 in the manifest"
    return None


def is_complete(path: Path) -> bool:
    """Every file the manifest lists is there with its size (old checkpoints: every rank left its marker)."""
    return damage(path) is None


def verify(path: str | Path, deep: bool = True) -> Path:
    """``path`` when intact; otherwise raises ``DamagedCheckpoint`` naming the checkpoint and the file."""
    problem = damage(path, deep)
    if problem:
        raise DamagedCheckpoint(f"{Path(path).name}: {problem} ({path})")
    return Path(path)


def newest_complete(run_dir: str | Path, deep: bool = False, say=None) -> Path | None:
    """The intact checkpoint with the highest step under a run folder (``runs/NAME``), if any. Each newer
    checkpoint passed over is reported through ``say`` (default: stderr) with the reason and the one used."""
    run_dir = Path(run_dir)
    skipped = []
    chosen = None
    for path in _by_recency(run_dir):
        problem = damage(path, deep)
        if problem is None:
            chosen = path
            break
        skipped.append(f"{path.name}: {problem}")
    fallback = f"using {chosen.name}" if chosen else "no intact checkpoint left"
    for line in skipped:
        (say or _say)(f"skipped {line}; {fallback}")
    return chosen


def latest_checkpoint(run_dir: str | Path, deep: bool = False) -> Path:
    """The intact checkpoint with the highest step under a Ray Train run folder (``runs/NAME``)."""
    found = newest_complete(run_dir, deep)
    if found is None:
        raise FileNotFoundError(f"{run_dir}: no finished checkpoint (checkpoint_*/{STATE_FILE}); train first")
    return found


def resolve_checkpoint(path: str | Path, deep: bool = False) -> Path:
    """A checkpoint folder (verified), a weights folder, or a run folder (its newest intact checkpoint), as an
    absolute path."""
    path = Path(path).resolve()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint or run folder")
    if (path / STATE_FILE).is_file():
        return verify(path, deep)
    if path.name == WEIGHTS_DIR and (path.parent / STATE_FILE).is_file():
        verify(path.parent, deep)  # the weights folder of a checkpoint: as intact as the checkpoint
        return path
    if (path / WEIGHTS_DIR).is_dir() or (path / "config.json").is_file() or not any(path.glob("checkpoint_*")):
        return path
    return latest_checkpoint(path, deep)


def weights_dir(path: str | Path) -> Path:
    """The serving weights of a checkpoint folder (its ``weights/``), or a weights folder itself."""
    path = Path(path)
    return path / WEIGHTS_DIR if (path / WEIGHTS_DIR).is_dir() else path


def stale_checkpoints(run_dir: str | Path, keep: int) -> list[Path]:
    """What rotation removes: complete checkpoints beyond the newest ``keep``, and incomplete leftovers older
    than the newest complete one (a newer incomplete one may still be being written)."""
    ordered = _by_recency(run_dir)
    complete = [p for p in ordered if is_complete(p)]
    if not complete:
        return []
    step, mtime = _recency(complete[0])
    leftovers = [p for p in ordered if p not in complete and _older(_recency(p), step, mtime)]
    return complete[keep:] + leftovers


def _older(recency: tuple[int, float], step: int, mtime: float) -> bool:
    """A checkpoint of unknown step (no state, a name without one) counts as older when written earlier."""
    return recency[0] < step if recency[0] >= 0 else recency[1] < mtime


def _by_recency(run_dir: str | Path) -> list[Path]:
    """The checkpoint folders of a run folder, newest first (Ray keeps a ``checkpoint_*.json`` file beside them)."""
    run_dir = Path(run_dir)
    found = [p for p in run_dir.glob("checkpoint_*") if p.is_dir()] if run_dir.is_dir() else []
    return sorted(found, key=_recency, reverse=True)


def _recency(path: Path) -> tuple[int, float]:
    """A checkpoint's step (from its state, else its name ``checkpoint_000008``), then its age on disk."""
    try:
        step = checkpoint_step(path)
    except (OSError, ValueError, KeyError, TypeError):
        match = re.fullmatch(r"checkpoint_(\d+)", path.name)
        step = int(match.group(1)) if match else -1
    return step, path.stat().st_mtime


def _size_problem(path: Path, record: dict) -> str | None:
    file = path / record["name"]
    if not file.is_file():
        return f"{record['name']} is missing"
    size = file.stat().st_size
    if size != record["size"]:
        return f"{record['name']} is {size} bytes, the manifest says {record['size']}"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _say(message: str) -> None:
    print(f"[faceforge] {message}", file=sys.stderr, flush=True)
