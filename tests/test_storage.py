"""Every shared path in object storage, MLflow as a tracking server: a real S3 API server (moto) and a real
``mlflow server --serve-artifacts`` on loopback, started once for this module.

The S3 server checks credentials: its first requests (unauthenticated) create a user and its key, and every
request after that must be signed with that key."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "mmface_dit_tiny.yaml")
FACEFORGE = [sys.executable, "-m", "pipelines"]
BUCKET = "faceforge-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[:4]} exited with {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout_s} s")


@dataclass
class Servers:
    s3: str
    mlflow: str
    key: str
    secret: str
    artifacts: Path

    def variables(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.s3,
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_DEFAULT_REGION": "us-east-1",
            "MLFLOW_TRACKING_URI": self.mlflow,
        }


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    import boto3

    root = tmp_path_factory.mktemp("servers")
    started = []
    try:
        s3_port, mlflow_port = _free_port(), _free_port()
        s3 = f"http://127.0.0.1:{s3_port}"
        moto = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started.append(moto)
        mlflow = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(mlflow_port),
                "--backend-store-uri",
                f"sqlite:///{root / 'mlflow.db'}",
                "--serve-artifacts",
                "--artifacts-destination",
                str(root / "artifacts"),
                "--workers",
                "1",
            ],  # fmt: skip
            cwd=root,
            stdout=open(root / "mlflow.log", "w"),
            stderr=subprocess.STDOUT,
        )
        started.append(mlflow)
        _wait_http(f"{s3}/moto-api/", moto)
        iam = boto3.client("iam", endpoint_url=s3, region_name="us-east-1", aws_access_key_id="boot",
                           aws_secret_access_key="boot")  # fmt: skip
        iam.create_user(UserName="faceforge")
        key = iam.create_access_key(UserName="faceforge")["AccessKey"]
        allow_all = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="faceforge", PolicyName="all", PolicyDocument=json.dumps(allow_all))
        found = Servers(s3, f"http://127.0.0.1:{mlflow_port}", key["AccessKeyId"], key["SecretAccessKey"],
                        root / "artifacts")  # fmt: skip
        boto3.client("s3", endpoint_url=s3, region_name="us-east-1", aws_access_key_id=found.key,
                     aws_secret_access_key=found.secret).create_bucket(Bucket=BUCKET)  # fmt: skip
        _wait_http(f"{found.mlflow}/health", mlflow)
        yield found
    finally:
        for process in started:
            process.terminate()
        for process in started:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture
def in_servers(servers, monkeypatch) -> Servers:
    for key, value in servers.variables().items():
        monkeypatch.setenv(key, value)
    return servers


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("faceforge: error: ")]


def _files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_prepare_train_with_a_killed_worker_publish_and_serve_with_every_path_in_the_bucket(
    servers, synth_root, tmp_path
):
    import requests
    from mlflow import MlflowClient

    from modeling import storage

    work, home, temp = tmp_path / "work", tmp_path / "home", tmp_path / "tmp"
    for folder in (work, home, temp):
        folder.mkdir()
    env = {**os.environ, **servers.variables(), "HOME": str(home), "TMPDIR": str(temp), "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)

    def faceforge(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
        # timeouts are 3x what each step takes on a quiet 2-core machine; a step that runs out shows where it was
        try:
            done = subprocess.run([*FACEFORGE, *args], cwd=work, env=env, capture_output=True, text=True,
                                  timeout=timeout)  # fmt: skip
        except subprocess.TimeoutExpired as late:
            out, err = (part.decode(errors="replace") if part else "" for part in (late.stdout, late.stderr))
            pytest.fail(f"{args[:2]} still running after {timeout} s; output so far:\n{out[-1500:]}\n{err[-3000:]}")
        assert done.returncode == 0, (args[:2], done.stderr[-3000:])
        return done

    prepared, runs = f"s3://{BUCKET}/e2e/prepared", f"s3://{BUCKET}/e2e/runs"
    faceforge("data", "prepare", "--layout", "celebamask-hq", "--root", str(synth_root), "--out", prepared,
              "--size", "32", "--codec", "pixel:2", "--rows-per-shard", "24", "--quiet")  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        for key, value in servers.variables().items():
            mp.setenv(key, value)
        manifest = json.loads(storage.read_text(f"{prepared}/manifest.json"))
        assert manifest["counts"]["n_written"] == 72 and all(s["sha256"] for s in manifest["shards"])

    trained = faceforge("train", CONFIG, f"data={prepared}", f"storage={runs}", "name=e2e", "max_steps=6",
                        "ckpt_every=2", "keep=2", "log_every=1", "batch=4", "sample_every=0", "logging.n_samples=2",
                        "logging.sample_steps=2", "fault.kill_rank=1", "fault.kill_at_step=3", timeout=600)  # fmt: skip
    summary = json.loads(trained.stdout[trained.stdout.index("{") :])
    assert summary["checkpoint"] == f"{runs}/e2e/checkpoint_000006"
    assert "fault injection: rank 1 exits at step 3" in trained.stdout + trained.stderr

    with pytest.MonkeyPatch.context() as mp:
        for key, value in servers.variables().items():
            mp.setenv(key, value)
        run_dir = storage.location(f"{runs}/e2e")
        assert storage.is_file(run_dir / ".fault_injected")  # the worker really died, and the run went on
        folders = sorted(c.name for c in storage.children(run_dir, folders_only=True))
        assert folders == ["checkpoint_000004", "checkpoint_000006"]  # rotated to checkpoint.keep in the bucket
        assert all(storage.is_file(run_dir / f / "manifest.json") for f in folders)
        assert json.loads(storage.read_text(run_dir / "progress.json"))["step"] == 6

        client = MlflowClient(servers.mlflow)
        run = client.get_run(summary["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert sorted(steps) == list(range(1, 7))  # each step once, the killed worker's steps included
        assert [a.path for a in client.list_artifacts(run.info.run_id, "samples")]  # the grid, through the server

        published = json.loads(faceforge("publish", "e2e", "--storage", runs).stdout)
        assert published["checkpoint"] == f"{runs}/e2e/checkpoint_000006"
        assert published["examples"] == 4  # the page's example conditions, from the held-out shards in the bucket

    port = _free_port()
    server = subprocess.Popen(
        [*FACEFORGE, "serve", "--port", str(port), "--model", published["model_uri"].removeprefix("models:/"),
         "--num-cpus", "2"],  # fmt: skip
        cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz", server, timeout_s=300)
        answer = requests.post(f"http://127.0.0.1:{port}/v1/generate", json={"prompt": "a face", "steps": 2},
                               timeout=300)  # fmt: skip
        assert answer.status_code == 200, answer.text[:500]
        assert len(answer.json()["images"]) == 1
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    # nothing of the run was written to this machine's disk outside the temp and cache folders
    assert _files_under(work) == []
    assert any((home / ".cache" / "faceforge").rglob("MLmodel"))  # the replica's cache of the version


# ------------------------------------------------------------------------------------- damaged files


def test_a_damaged_checkpoint_in_the_bucket_is_passed_over_with_a_message(in_servers, capsys):
    from modeling import storage
    from modeling.checkpoints import (
        MANIFEST_FILE,
        STATE_FILE,
        DamagedCheckpoint,
        newest_complete,
        stale_checkpoints,
        verify,
        write_manifest,
    )

    run_dir = storage.location(f"s3://{BUCKET}/damaged-ckpt/run")

    def saved(step: int) -> storage.Location:
        path = run_dir / f"checkpoint_{step:06d}"
        files = {"deepspeed/state/mp_rank_00_model_states.pt": bytes(range(256)) * 8, "weights/model.safetensors":
                 bytes(4096), STATE_FILE: json.dumps({"step": step, "world": 1, "manifest": 1}).encode()}  # fmt: skip
        import hashlib

        for name, data in files.items():
            storage.write_bytes(path / name, data)
        write_manifest(path, [{"name": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
                              for n, d in files.items()])  # fmt: skip
        return path

    oldest, middle, newest = saved(2), saved(4), saved(6)
    model_state = newest / "deepspeed/state/mp_rank_00_model_states.pt"
    storage.write_bytes(model_state, storage.read_bytes(model_state)[:1000])  # an upload cut short
    storage.delete(middle / MANIFEST_FILE)  # a save that never finished
    assert newest_complete(run_dir) == oldest
    err = capsys.readouterr().err
    assert "skipped checkpoint_000006: deepspeed/state/mp_rank_00_model_states.pt is 1000 bytes" in err
    assert "skipped checkpoint_000004: no manifest.json (the save never finished)" in err
    assert "using checkpoint_000002" in err
    with pytest.raises(DamagedCheckpoint, match="checkpoint_000006: deepspeed/state/mp_rank_00_model_states.pt"):
        verify(newest)
    # same bytes count, other bytes: only the checksum sees it
    weights = oldest / "weights/model.safetensors"
    storage.write_bytes(weights, b"\x01" * 4096)
    assert newest_complete(run_dir) == oldest and newest_complete(run_dir, deep=True) is None
    assert stale_checkpoints(run_dir, keep=1) == []  # nothing intact to keep: nothing removed


@pytest.fixture
def prepared_in_bucket(prepared, in_servers, request) -> str:
    """The session's prepared shards, uploaded to a prefix of their own (each test damages its copy)."""
    from modeling import storage

    uri = f"s3://{BUCKET}/{request.node.name[:40]}/prepared"
    storage.upload_dir(prepared, storage.location(uri))
    return uri


def _garble_middle(uri: str) -> None:
    from modeling import storage

    data = bytearray(storage.read_bytes(uri))
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)  # the footer stays intact: only reading the pages finds it
    storage.write_bytes(uri, bytes(data))


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_shard_garbled_inside_ends_the_run_in_one_line_without_restarts(prepared_in_bucket, tmp_path, capsys, split):
    from mlflow import MlflowClient

    from modeling import storage
    from pipelines.cli import main
    from pipelines.data.prepare import shard_finished

    manifest = json.loads(storage.read_text(f"{prepared_in_bucket}/manifest.json"))
    shard = next(s["file"] for s in manifest["shards"] if s["split"] == split)
    _garble_middle(f"{prepared_in_bucket}/shards/{shard}")
    runs = f"{prepared_in_bucket.rsplit('/', 1)[0]}/runs"
    experiment = f"damaged-{split}"
    started = time.monotonic()
    code = main(["train", CONFIG, f"data={prepared_in_bucket}", f"storage={runs}", "max_steps=2", "workers=1",
                 f"experiment={experiment}"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    (line,) = _error_lines(err)
    assert f"shards/{shard}" in line and "faceforge data prepare" in line and "sha256" in line
    assert time.monotonic() - started < 60  # no worker started, none restarted
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.status == "FAILED"
    # what the line says mends it: prepare checks every finished shard's checksum and redoes this one
    assert not shard_finished(storage.location(prepared_in_bucket), shard.removesuffix(".parquet"))


# ----------------------------------------------------------------------------------- bad configuration


def _one_line(capsys, argv: list[str]) -> str:
    from pipelines.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = _error_lines(err)
    return line


def test_bad_storage_and_tracking_settings_are_one_line_each(in_servers, synth_root, monkeypatch, capsys):
    prepare = ["data", "prepare", "--layout", "celebamask-hq", "--root", str(synth_root), "--size", "32"]
    line = _one_line(capsys, [*prepare, "--out", "s3://no-such-bucket/prepared"])
    assert "no bucket 'no-such-bucket'" in line and in_servers.s3 in line
    line = _one_line(capsys, [*prepare, "--out", "nosuchfs://bucket/prepared"])
    assert "nosuchfs://" in line and "s3://" in line
    line = _one_line(capsys, ["train", CONFIG, f"storage=s3://{BUCKET}/runs", "data=s3://no-such-bucket/x"])
    assert "no bucket 'no-such-bucket'" in line

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    line = _one_line(capsys, [*prepare, "--out", f"s3://{BUCKET}/prepared"])
    assert "refused the credentials" in line and "AWS_SECRET_ACCESS_KEY" in line
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", in_servers.secret)

    silent = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", silent)
    started = time.monotonic()
    line = _one_line(capsys, ["publish", "some-run", "--storage", f"s3://{BUCKET}/runs"])
    assert "does not answer" in line and silent in line and "AWS_ENDPOINT_URL" in line
    assert time.monotonic() - started < 30
    monkeypatch.setenv("AWS_ENDPOINT_URL", in_servers.s3)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", silent)
    line = _one_line(capsys, ["train", CONFIG, f"storage=s3://{BUCKET}/runs", f"data=s3://{BUCKET}/nothing"])
    assert f"tracking server {silent} does not answer" in line
    line = _one_line(capsys, ["publish", "some-run", "--storage", f"s3://{BUCKET}/runs"])
    assert f"tracking server {silent} does not answer" in line
