"""The benchmarks run on CPU and print their JSON contract last: the training step (both architectures) and
the Serve benchmark (its --quick size)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import train_step

CONTRACT = {
    "model",
    "device",
    "batch",
    "depth",
    "samples_per_s",
    "mfu",
    "peak_gib",
    "peer",
    "peer_samples_per_s",
    "speedup_vs_peer",
}


@pytest.mark.parametrize("model", ["mmface-dit-tiny", "face-mogle-tiny"])
def test_train_step_prints_the_contract_last(model, capsys):
    result = train_step.main(["--model", model, "--device", "cpu", "--steps", "2", "--warmup", "1", "--no-sample"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == result
    assert CONTRACT <= set(result)
    assert result["model"] == model and result["device"] == "cpu" and result["mfu"] is None
    assert result["samples_per_s"] > 0 and result["peer_samples_per_s"] > 0
    assert result["speedup_vs_peer"] == pytest.approx(result["samples_per_s"] / result["peer_samples_per_s"], rel=1e-2)
    assert result["optimizer"] == "modeling.optim.AdamW8bit"
    assert result["peer_optimizer"] == "bitsandbytes.optim.AdamW8bit"


def test_unknown_model_names_the_known_ones():
    with pytest.raises(SystemExit, match="mmface-dit-xl"):
        train_step.main(["--model", "no-such-model", "--device", "cpu"])


SERVE_CONTRACT = {
    "device",
    "model",
    "steps",
    "results",
    "bare",
    "batching_speedup",
    "serve_vs_bare",
    "serve_vs_bare_range",
    "unbatched_vs_bare",
    "replica_cpu_vs_bare",
    "serve_cpu_vs_bare",
    "rounds",
    "load_test",
}


def test_serve_bench_quick_prints_the_contract_last():
    # a subprocess: the bench starts its own private Ray, and this test session may hold one already
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "bench/serve.py", "--quick", "--device", "cpu"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert SERVE_CONTRACT <= set(result)
    assert result["device"] == "cpu" and result["model"] == "mmface-dit-tiny"
    rows = {(r["mode"], r["concurrency"]): r for r in result["results"]}
    assert set(rows) == {(mode, c) for mode in ("batched", "unbatched") for c in (1, 8)}
    load = result["load_test"]
    assert (load["requests"], load["concurrency"]) == (20, 16)
    for row in [*rows.values(), load]:
        assert row["errors"] == 0 and row["images_per_s"] > 0 and 0 < row["p50_s"] <= row["p99_s"]
    # the unbatched deployment samples one image per call; the batched one put several requests in one call
    assert all(rows["unbatched", c]["mean_batch"] == 1 for c in (1, 8))
    assert max(r["mean_batch"] for r in [rows["batched", 8], load]) > 1
    assert set(result["bare"]) == {"1", "8"} and all(v > 0 for v in result["bare"].values())
    assert result["batching_speedup"] > 0 and result["serve_vs_bare"] > 0
    # one interleaved round at --quick: bare loop and Serve on the same requests, with where the CPU went
    (round_,) = result["rounds"]
    assert set(round_) == {"bare_8", "batched", "bare_1", "unbatched"}
    assert round_["bare_8"]["cpu_ms_per_image"] > 0 and 0 < round_["bare_8"]["png_share"] < 0.5
    cpu = round_["batched"]["cpu_ms_per_image"]
    assert {"replica", "ingress", "proxy", "client", "ray", "other"} == set(cpu)
    assert cpu["replica"] > 0 and cpu["client"] > 0
    low, high = result["serve_vs_bare_range"]
    assert low == high == result["serve_vs_bare"]


@pytest.mark.slow
def test_trainer_overhead_prints_the_contract_last(prepared, tmp_path):
    # a subprocess: the bench starts its own private Ray; the reference loop and the trainer run the same steps
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "bench/trainer_overhead.py", "--data", str(prepared), "--steps", "3",
         "--configs", "configs/mmface_dit_tiny.yaml", "--modes", "bare", "trainer"],
        cwd=root, capture_output=True, text=True, timeout=900,
        env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    (config,) = result["configs"]
    assert config["bare_samples_per_s"] > 0 and config["trainer_samples_per_s"] > 0
    assert config["ratio"] == pytest.approx(config["trainer_samples_per_s"] / config["bare_samples_per_s"], rel=1e-2)
    # the trainer's own per-step breakdown and start-up milestones, in the order they happen
    assert {"data_wait", "forward", "backward_allreduce", "optimizer", "ema"} <= set(config["breakdown_ms"])
    marks = [config["startup_s"][k] for k in ("mlflow", "dataset", "worker", "deepspeed", "first_batch")]
    assert marks == sorted(marks)
    startup = config["startup_s"]
    assert startup["first_batch"] <= config["first_step_s"]
