"""Faults a user meets on a shared machine, driven through the real CLI in subprocesses: Ctrl-C during training
and resuming, a killed ``data prepare``, and jobs side by side. Each leaves nothing running and loses nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FACEFORGE = [sys.executable, "-m", "pipelines"]


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return env


def _step(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "progress.json").read_text())["step"]
    except (OSError, ValueError):
        return 0


def _ray_processes(temp_dir: str | None = None) -> list[str]:
    """Command lines of live Ray processes (of one private Ray when ``temp_dir`` is given)."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
    found = [line for line in out if ("ray::" in line or "raylet" in line or "gcs_server" in line)]
    return [line for line in found if temp_dir is None or temp_dir in line]


def _private_rays() -> set[str]:
    return {str(p) for p in Path("/tmp").glob("ffray-*")}


def test_ctrl_c_stops_within_seconds_and_the_resumed_run_logs_every_step_once(prepared, tmp_path):
    from mlflow import MlflowClient

    env = _env(tmp_path)
    run_dir = tmp_path / "runs" / "interrupted"
    argv = [*FACEFORGE, "train", str(ROOT / "configs" / "mmface_dit_tiny.yaml"), f"data={prepared}",
            f"storage={tmp_path / 'runs'}", "name=interrupted", "max_steps=30", "log_every=1", "ckpt_every=5",
            "keep=2", "sample_every=0", "batch=4"]  # fmt: skip
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    for _ in range(2):
        before = set(_private_rays())
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        start = _step(run_dir)
        deadline = time.monotonic() + 240
        while _step(run_dir) < start + 7 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.3)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        ray_dirs = _private_rays() - before
        proc.send_signal(signal.SIGINT)
        stopped = time.monotonic()
        _, err = proc.communicate(timeout=60)
        assert time.monotonic() - stopped < 30
        assert proc.returncode == 130
        assert "faceforge: interrupted" in err and "Traceback" not in err
        time.sleep(2)
        for ray_dir in ray_dirs:  # the private Ray and everything it started are gone
            assert not _ray_processes(ray_dir), _ray_processes(ray_dir)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert [r.info.status for r in runs] == ["KILLED"]
        complete = sorted(p.name for p in run_dir.glob("checkpoint_*") if (p / "manifest.json").is_file())
        folders = [p for p in run_dir.glob("checkpoint_*") if p.is_dir()]
        assert len(folders) <= 2 and complete, complete  # checkpoint.keep=2

    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 31))  # every step once: none lost to an interrupt, none twice


def _ray_pids() -> set[int]:
    return {int(line.split(None, 1)[0]) for line in _ray_processes()}


def test_a_killed_prepare_leaves_no_ray_behind(synth_root, tmp_path):
    before = _ray_pids()  # the session's own Ray (other tests) stays; only what prepare started must go
    argv = [*FACEFORGE, "data", "prepare", "--layout", "celebamask-hq", "--root", str(synth_root),
            "--out", str(tmp_path / "out"), "--size", "32", "--codec", "pixel:2", "--rows-per-shard", "4"]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=ROOT, env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    started: set[int] = set()
    while (
        time.monotonic() < deadline
        and proc.poll() is None
        and not any(
            "MapWorker" in line or "ray::" in line
            for line in _ray_processes()
            if int(line.split(None, 1)[0]) in started
        )
    ):
        started = _ray_pids() - before  # until the precompute's workers are up
        time.sleep(0.2)
    assert proc.poll() is None and started, "prepare finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and started & _ray_pids():
        time.sleep(0.5)
    assert not started & _ray_pids(), _ray_processes()


@pytest.mark.slow
def test_two_trains_and_a_prepare_side_by_side_never_touch_each_other(prepared, synth_root, tmp_path):
    env = _env(tmp_path)
    config = str(ROOT / "configs" / "mmface_dit_tiny.yaml")
    common = [f"data={prepared}", f"storage={tmp_path / 'runs'}", "max_steps=8", "workers=1", "ckpt_every=4",
              "sample_every=0", "batch=4"]  # fmt: skip
    jobs = {
        name: subprocess.Popen(
            [*FACEFORGE, "train", config, f"name={name}", *common],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for name in ("first", "second")
    }
    jobs["prepare"] = subprocess.Popen(
        [*FACEFORGE, "data", "prepare", "--layout", "celebamask-hq", "--root", str(synth_root),
         "--out", str(tmp_path / "prepared"), "--size", "32", "--codec", "pixel:2"],  # fmt: skip
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    logs = {name: proc.communicate(timeout=600)[0] for name, proc in jobs.items()}
    for name, proc in jobs.items():
        assert proc.returncode == 0, (name, logs[name][-3000:])
        assert "RETRY" not in logs[name] and "placement group was removed" not in logs[name], name
    for name in ("first", "second"):
        assert _step(tmp_path / "runs" / name) == 8
