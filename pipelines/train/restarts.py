"""Why a run's worker group restarted, from which checkpoint, on how many workers: said by the trainer and kept in
MLflow.

Ray Train's controller calls ``FailureNote.after_exception`` when workers fail; it leaves one line per failure in
the run folder (``LAST_FAILURE``). The next worker group's rank 0 reads it once it has chosen the checkpoint to
resume from, prints the restart and records it in the MLflow run (``restarts/NNN.json``, tag
``faceforge.restarts``)."""

from __future__ import annotations

import json
import re
import time

from modeling import storage

LAST_FAILURE = ".last_failure"


NODE_LOST = re.compile(r"node (has )?(died|is dead|was (removed|lost|terminated|preempted))|nodedied|preempt", re.I)
WORKER_DIED = re.compile(r"actor died|actordied|died unexpectedly|exited unexpectedly|worker (exit|died)|killed", re.I)
PEER_GONE = re.compile(r"connection closed by peer|read error|connection reset|broken pipe", re.I)
KINDS = ("node lost", "worker died", "lost a peer", "worker raised")  # the cause first, its echoes after


def describe(worker_exceptions: dict) -> str:
    """One line: which ranks failed and why, the cause first (a lost node, a worker that died) and the ranks that
    only lost a peer in a collective after it."""
    parts = []
    for rank, error in worker_exceptions.items():
        text = " ".join(str(error).split())
        if NODE_LOST.search(text):
            kind = "node lost"
        elif WORKER_DIED.search(text):
            kind = "worker died"
        elif PEER_GONE.search(text):
            kind = "lost a peer"
        else:
            kind = "worker raised"
        parts.append((KINDS.index(kind), rank, f"rank {rank}: {kind} ({type(error).__name__}: {text[:160]})"))
    return "; ".join(line for _, _, line in sorted(parts)) or "unknown"


def _callback_base():
    try:
        from ray.train import UserCallback
    except ImportError:  # Ray Train V1: no controller callbacks; restarts are then recorded without a reason
        return object
    return UserCallback


class FailureNote(_callback_base()):
    """Runs in Ray Train's controller: notes each failure in the run folder for the next worker group."""

    def __init__(self, run_dir: str, storage_env: dict | None) -> None:
        self.run_dir = run_dir
        self.storage_env = storage_env

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        try:
            storage.adopt_environment(self.storage_env)
            entry = {"time": time.time(), "why": describe(worker_exceptions)}
            storage.write_text(storage.location(self.run_dir) / LAST_FAILURE, json.dumps(entry))
        except Exception:  # noqa: BLE001 - a note must never take the controller down
            pass


def take_last_failure(run_dir: str | None) -> dict | None:
    """The failure the controller noted before this worker group started (removed once read)."""
    if not run_dir:
        return None
    where = storage.location(run_dir) / LAST_FAILURE
    try:
        entry = json.loads(storage.read_text(where))
    except (OSError, ValueError):
        return None
    try:
        storage.delete(where)
    except OSError:
        pass
    return entry


def record_restart(run_dir: str | None, client, run_id: str | None, source, step: int, world: int) -> dict | None:
    """Rank 0 of a worker group that follows a failure: prints the restart and keeps it in MLflow."""
    failure = take_last_failure(run_dir)
    if failure is None:
        return None
    entry = {
        "time": time.time(),
        "failed_at": failure.get("time"),
        "why": failure.get("why", "unknown"),
        "from_checkpoint": source.name if source is not None else None,
        "step": step,
        "workers": world,
    }
    start = f"resumed from {entry['from_checkpoint']} (step {step})" if source is not None else "started over"
    print(f"[faceforge] restart after a failure: {entry['why']}; {start} on {world} worker(s)", flush=True)
    if client is not None and run_id:
        count = len(client.list_artifacts(run_id, "restarts")) + 1
        client.log_text(run_id, json.dumps(entry, indent=2), f"restarts/{count:03d}.json")
        client.set_tag(run_id, "faceforge.restarts", str(count))
    return entry
