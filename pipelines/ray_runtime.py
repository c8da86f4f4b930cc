"""Starting, joining and stopping Ray the same way from every job (prepare, train, publish, serve, eval)."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile

# the private local Ray of this process, if it started one: (temp folder, pids of the processes it runs)
_LOCAL: dict = {}
# Background work a private Ray on one machine does not need, which otherwise takes cores from training on a small
# machine (bench/trainer_overhead.py: Ray's daemons and helper actors together held ~0.18 of 2 cores while two
# workers trained): metrics export to Prometheus (nothing scrapes a private Ray) and Ray Train's node-preemption
# watcher (one machine has nobody to drain it). Each yields to a value already in the environment.
PRIVATE_RAY_QUIET = {"RAY_enable_metrics_collection": "0", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def ensure_ray(num_cpus: int | None = None, local: bool = False, log_to_driver: bool = True) -> None:
    """Joins the cluster named by ``RAY_ADDRESS`` (what ``ray job submit`` sets), else starts a private local Ray.

    A local Ray is this process's own: a fresh instance in its own temp folder, never one that another job
    (or an earlier ``ray start``) left running, so two faceforge jobs on one machine never share, and never
    clean up, each other's workers. ``local=True`` ignores ``RAY_ADDRESS`` (``faceforge serve``). A local Ray
    gets every core unless told otherwise; ``num_cpus`` lets tests and the demo reserve headroom.
    ``stop_ray`` (also run at exit) stops it and every process it started. ``log_to_driver=False`` keeps the
    workers' output in Ray's log files instead of this process's console (``faceforge demo``).
    """
    import ray

    quiet_ray_data()
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS") and not local:
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=log_to_driver)
        return
    # short path: Ray's unix sockets live under it and their paths are capped at ~107 characters
    temp_dir = tempfile.mkdtemp(prefix="ffray-", dir="/tmp" if os.path.isdir("/tmp") else None)
    _LOCAL["temp_dir"] = temp_dir
    # a watcher in its own session ends whatever this Ray leaves behind if this process dies abruptly
    _LOCAL["reaper"] = subprocess.Popen(
        [sys.executable, "-m", "pipelines.reaper", str(os.getpid()), temp_dir],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    ).pid
    atexit.register(stop_ray)  # registered before ray.init: runs after Ray's own exit hook
    # Every process of this Ray must find *this* Ray when it looks one up without an address (Ray Train's
    # placement-group cleaner does, through the state API): with two local Rays up it would otherwise fail
    # ("Found multiple active Ray instances") and the run's workers could be torn down. So the GCS gets a
    # port chosen here, on loopback, and RAY_ADDRESS names it in the environment the raylet and its workers
    # inherit.
    port = _free_port()
    _LOCAL["env"] = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT", *PRIVATE_RAY_QUIET)}
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    for key, value in PRIVATE_RAY_QUIET.items():
        os.environ.setdefault(key, value)
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=log_to_driver,
        configure_logging=True,
        logging_level="WARNING",
        _temp_dir=temp_dir,
    )


def stop_ray(grace_s: float = 3.0) -> None:
    """Shut down this process's Ray. For a private local Ray, every process it started is gone afterwards:
    workers whose raylet died first (a Ctrl-C reaches the whole process group) are terminated, then killed."""
    import psutil
    import ray

    started = []
    if _LOCAL:
        try:
            started = [p for p in psutil.Process().children(recursive=True) if p.pid != _LOCAL.get("reaper")]
        except psutil.Error:
            started = []
    try:
        if ray.is_initialized():
            ray.shutdown()
    finally:
        alive = [p for p in started if _running(p)]
        for p in alive:
            _quietly(p.terminate)
        _, alive = psutil.wait_procs(alive, timeout=grace_s)
        for p in alive:
            _quietly(p.kill)
        if _LOCAL.get("temp_dir"):
            shutil.rmtree(_LOCAL.pop("temp_dir"), ignore_errors=True)
        for key, value in _LOCAL.pop("env", {}).items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def is_private() -> bool:
    """Whether this process runs its own local Ray (started by ``ensure_ray``), not a cluster's."""
    return bool(_LOCAL.get("temp_dir"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _running(process) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _quietly(action) -> None:
    import psutil

    try:
        action()
    except psutil.Error:
        pass


def quiet_ray_data() -> None:
    """Our own progress bars say what matters; Ray Data's per-operator bars drown them on a console."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    context.print_on_execution_start = False
