"""A checkpoint folder, shared by training (resume), publishing and serving: its layout, whether it is intact, the
newest intact one of a run folder, and where its serving weights are. Run folders may be local or in object storage
(``modeling.storage``): the functions here take either, and return a ``Path`` for a local folder, a ``Location``
elsewhere.

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
import re
import sys
from contextlib import contextmanager
from pathlib import Path

from modeling import storage
from modeling.storage import Location, Where

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


def checkpoint_step(path: Where) -> int:
    return int(json.loads(storage.read_text(storage.location(path) / STATE_FILE))["step"])


def file_records(directory: str | Path) -> list[dict]:
    """Name (relative, POSIX), size and sha256 of every file under a local ``directory``: one rank's part of a
    manifest (ranks stage their files in local temp folders before Ray copies them into the run folder)."""
    directory = Path(directory)
    return [
        {"name": path.relative_to(directory).as_posix(), "size": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    ]


def write_manifest(path: Where, records: list[dict]) -> Path | Location:
    """The manifest of a checkpoint whose files are all in place, written atomically (tmp + rename on a disk, a
    single put on an object store).

    Refuses to write it when a listed file is missing or has another size than recorded: a copy into the run
    folder that lost bytes must leave the checkpoint incomplete, not certify it."""
    path = storage.location(path)
    sizes = storage.walk_files(path)
    for record in records:
        problem = _size_problem(sizes, record)
        if problem:
            raise DamagedCheckpoint(f"{path.name}: {problem}; no manifest written")
    manifest = {"format": MANIFEST_FORMAT, "files": sorted(records, key=lambda r: r["name"])}
    with no_space_left(path):
        return storage.native(storage.write_text(path / MANIFEST_FILE, json.dumps(manifest)))


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


def damage(path: Where, deep: bool = False) -> str | None:
    """Why the checkpoint at ``path`` is not usable (one line, naming the file), or None when it is intact.
    Sizes are always checked (one listing of the folder); ``deep`` also compares every file's sha256 with the
    manifest."""
    path = storage.location(path)
    sizes = storage.walk_files(path)
    if not sizes and not storage.is_dir(path):
        return "no such folder"
    if STATE_FILE not in sizes:
        return f"no {STATE_FILE} (the save never finished)"
    try:
        state = json.loads(storage.read_text(path / STATE_FILE))
        int(state["step"])
    except (ValueError, KeyError, TypeError):
        return f"{STATE_FILE} is not a trainer state (empty or garbled)"
    if "manifest" not in state:  # written before manifests: every rank's marker is the only evidence
        missing = [r for r in range(state.get("world") or 0) if rank_marker(r) not in sizes]
        return f"rank {missing[0]} never finished (no {rank_marker(missing[0])})" if missing else None
    if MANIFEST_FILE not in sizes:
        return f"no {MANIFEST_FILE} (the save never finished)"
    try:
        records = json.loads(storage.read_text(path / MANIFEST_FILE))["files"]
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST_FILE} is not a manifest (empty or garbled)"
    for record in records:
        problem = _size_problem(sizes, record)
        if problem:
            return problem
    if deep:
        for record in records:
            if storage.sha256(path / record["name"]) != record["sha256"]:
                return f"{record['name']} does not match its sha256 in the manifest"
    return None


def is_complete(path: Where) -> bool:
    """Every file the manifest lists is there with its size (old checkpoints: every rank left its marker)."""
    return damage(path) is None


def verify(path: Where, deep: bool = True) -> Path | Location:
    """``path`` when intact; otherwise raises ``DamagedCheckpoint`` naming the checkpoint and the file."""
    problem = damage(path, deep)
    if problem:
        raise DamagedCheckpoint(f"{storage.location(path).name}: {problem} ({path})")
    return storage.native(path)


def newest_complete(run_dir: Where, deep: bool = False, say=None) -> Path | Location | None:
    """The intact checkpoint with the highest step under a run folder (``runs/NAME``), if any. Each newer
    checkpoint passed over is reported through ``say`` (default: stderr) with the reason and the one used."""
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
    return storage.native(chosen) if chosen is not None else None


def latest_checkpoint(run_dir: Where, deep: bool = False) -> Path | Location:
    """The intact checkpoint with the highest step under a Ray Train run folder (``runs/NAME``)."""
    found = newest_complete(run_dir, deep)
    if found is None:
        raise FileNotFoundError(f"{run_dir}: no finished checkpoint (checkpoint_*/{STATE_FILE}); train first")
    return found


def resolve_checkpoint(path: Where, deep: bool = False) -> Path | Location:
    """A checkpoint folder (verified), a weights folder, or a run folder (its newest intact checkpoint), as an
    absolute path (or a ``Location`` in object storage)."""
    loc = storage.location(path)
    if not storage.exists(loc) and not storage.is_dir(loc):
        raise FileNotFoundError(f"{loc}: no such checkpoint or run folder")
    if storage.is_file(loc / STATE_FILE):
        return verify(loc, deep)
    if loc.name == WEIGHTS_DIR and storage.is_file(loc.parent / STATE_FILE):
        verify(loc.parent, deep)  # the weights folder of a checkpoint: as intact as the checkpoint
        return storage.native(loc)
    if (
        storage.is_dir(loc / WEIGHTS_DIR)
        or storage.is_file(loc / "config.json")
        or not any(c.name.startswith("checkpoint_") for c in storage.children(loc, folders_only=True))
    ):
        return storage.native(loc)
    return latest_checkpoint(loc, deep)


def weights_dir(path: Where) -> Path | Location:
    """The serving weights of a checkpoint folder (its ``weights/``), or a weights folder itself."""
    loc = storage.location(path)
    inner = loc / WEIGHTS_DIR
    if loc.is_local:  # relative local paths stay relative: serving and tests build paths from them
        return Path(path) / WEIGHTS_DIR if Path(inner.path).is_dir() else Path(path)
    return inner if storage.is_dir(inner) else loc


def stale_checkpoints(run_dir: Where, keep: int) -> list[Path | Location]:
    """What rotation removes: complete checkpoints beyond the newest ``keep``, and incomplete leftovers older
    than the newest complete one (a newer incomplete one may still be being written)."""
    ordered = _by_recency(run_dir)
    complete = [p for p in ordered if is_complete(p)]
    if not complete:
        return []
    step, mtime = _recency(complete[0])
    leftovers = [p for p in ordered if p not in complete and _older(_recency(p), step, mtime)]
    return [storage.native(p) for p in complete[keep:] + leftovers]


def _older(recency: tuple[int, float], step: int, mtime: float) -> bool:
    """A checkpoint of unknown step (no state, a name without one) counts as older when written earlier."""
    return recency[0] < step if recency[0] >= 0 else recency[1] < mtime


def _by_recency(run_dir: Where) -> list[Location]:
    """The checkpoint folders of a run folder, newest first (Ray keeps a ``checkpoint_*.json`` file beside them)."""
    found = [c for c in storage.children(run_dir, folders_only=True) if c.name.startswith("checkpoint_")]
    return sorted(found, key=_recency, reverse=True)


def _recency(path: Location) -> tuple[int, float]:
    """A checkpoint's step (from its state, else its name ``checkpoint_000008``), then when it was written."""
    try:
        step = checkpoint_step(path)
    except (OSError, ValueError, KeyError, TypeError):
        match = re.fullmatch(r"checkpoint_(\d+)", path.name)
        step = int(match.group(1)) if match else -1
    return step, storage.newest_mtime(path)


def _size_problem(sizes: dict[str, int], record: dict) -> str | None:
    size = sizes.get(record["name"])
    if size is None:
        return f"{record['name']} is missing"
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
