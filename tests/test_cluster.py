"""Cluster path: the YAML files parse with the keys their tools require, and `ray job submit` really runs."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_runtime_env_keys_are_ray_runtime_env_fields():
    env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**env)  # Ray validates field names and types
    assert ".venv/" in env["excludes"] and env["env_vars"]["HF_HUB_OFFLINE"] == "1"


def test_cluster_launcher_yaml_has_a_cpu_head_and_gpu_workers():
    config = yaml.safe_load((ROOT / "cluster" / "cluster.yaml").read_text())
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers"):
        assert key in config, key
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert "GPU" not in head["resources"]
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types and all(
        {"node_config", "min_workers", "max_workers", "resources"} <= set(t) for t in types.values()
    )
    assert config["provider"]["type"]


def test_kuberay_rayjob_manifest():
    job = yaml.safe_load((ROOT / "cluster" / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    # the entrypoint is a `faceforge train` command whose config ships in configs/ and whose overrides are known keys
    command, subcommand, config_file, *overrides = shlex.split(spec["entrypoint"])
    assert (command, subcommand) == ("faceforge", "train") and config_file.startswith("configs/")
    assert (ROOT / config_file).is_file(), config_file
    from pipelines.train.config import load_config

    config = load_config(ROOT / config_file, overrides)  # raises on an unknown key or a bad value
    assert config.scaling.num_workers >= 1
    yaml.safe_load(spec["runtimeEnvYAML"])
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    workers = cluster["workerGroupSpecs"]
    assert workers and all(w["groupName"] and w["replicas"] >= 1 for w in workers)
    limits = workers[0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(port: int) -> bool:
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2)
    except urllib.error.HTTPError:
        return True  # it answered (possibly 401 without the token)
    except OSError:
        return False
    return True


@pytest.mark.slow
def test_ray_job_submit_trains_and_the_mlflow_run_appears(prepared, tmp_path):
    """`ray start --head` on loopback, then `ray job submit ... -- faceforge train configs/mmface_dit_tiny.yaml`."""
    ray_cli = shutil.which("ray", path=str(BIN)) or "ray"
    port, dashboard, agent = _free_port(), _free_port(), _free_port()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MLFLOW_TRACKING_URI": uri}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [ray_cli, "start", "--head", f"--port={port}", f"--dashboard-port={dashboard}", "--num-cpus=2",
         "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--block",
         f"--dashboard-agent-listen-port={agent}",  # the session's own Ray holds the default agent port
         f"--temp-dir={tempfile.mkdtemp(prefix='rj', dir='/tmp')}"],  # short: unix socket paths are capped
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        token = ""
        for _ in range(90):  # the head is up once it hands out a token and its dashboard answers
            time.sleep(2)
            if not token:
                got = subprocess.run([ray_cli, "get-auth-token"], env=env, capture_output=True, text=True)
                token = got.stdout.strip().splitlines()[-1] if got.returncode == 0 and got.stdout.strip() else ""
            if token and _answers(dashboard):
                break
        job_env = {**env, "RAY_ADDRESS": f"http://127.0.0.1:{dashboard}", "RAY_AUTH_MODE": "token",
                   "RAY_AUTH_TOKEN": token}  # fmt: skip
        runtime_env = {"excludes": [".venv/", ".git/", "mlruns/", "runs/", ".torch_extensions/", "demo_out/"]}
        for _ in range(20):  # the job agent starts a little after the dashboard
            submit = subprocess.run(
                [ray_cli, "job", "submit", "--working-dir", str(ROOT), "--runtime-env-json", json.dumps(runtime_env),
                 "--", "faceforge", "train", "configs/mmface_dit_tiny.yaml", f"data={prepared}",
                 f"storage={tmp_path / 'runs'}", "name=submitted", "max_steps=4", "ckpt_every=4"],
                env=job_env, capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            if "No available agent" not in submit.stdout + submit.stderr:
                break
            time.sleep(3)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "succeeded" in submit.stdout + submit.stderr
    finally:
        head.terminate()
        head.wait(timeout=60)
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.`faceforge.run_name` = 'submitted'"
    )
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]


def test_the_shared_mlflow_server_manifest_serves_artifacts_where_jobs_and_replicas_look():
    docs = [d for d in yaml.safe_load_all((ROOT / "cluster" / "mlflow.yaml").read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    deployment, service = by_kind["Deployment"], by_kind["Service"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["mlflow", "server"] and "--serve-artifacts" in container["args"]
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    url = f"http://{service['metadata']['name']}.{service['metadata']['namespace']}.svc:{service['spec']['ports'][0]['port']}"
    job = yaml.safe_load((ROOT / "cluster" / "rayjob.yaml").read_text())
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]["MLFLOW_TRACKING_URI"] == url
    assert url in (ROOT / "cluster" / "rayservice.yaml").read_text()
    head = yaml.safe_load((ROOT / "cluster" / "cluster.yaml").read_text())["head_start_ray_commands"]
    assert any("mlflow server" in command and "--serve-artifacts" in command for command in head)
