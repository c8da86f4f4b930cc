"""The code that only runs on CUDA: bf16 DeepSpeed training of both tiny models (and resuming it), the MFU and
GPU-memory metrics, the generator's bf16 autocast against its fp32 image, a Serve replica on a GPU, and the
training-step benchmark on CUDA.

Every test here is marked ``gpu`` (``make test-gpu`` = ``pytest -m gpu``; ``make test`` leaves them out) and
skips, saying why, where no CUDA device exists.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU suite runs where one exists"),
]

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
GPU = ("gpu=true", "workers=1", "precision=bf16", "sample_every=0", "log_every=1")


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def _train(config_file: str, prepared: Path, tmp_path: Path, *overrides: str) -> dict:
    from pipelines.train.config import load_config
    from pipelines.train.run import train

    common = [f"data={prepared}", f"storage={tmp_path / 'runs'}", *GPU]
    return train(load_config(CONFIGS / config_file, [*common, *overrides]))


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def _step_of(checkpoint: str) -> int:
    from modeling.checkpoints import STATE_FILE

    return json.loads((Path(checkpoint) / STATE_FILE).read_text())["step"]


def _assert_gpu_metrics(uri: str, run_id: str, steps: int) -> None:
    """``train/mfu`` in (0, 1) and ``sys/gpu_mem_gb`` in (0, the device's memory) at every logged step."""
    mfu = _history(uri, run_id, "train/mfu")
    memory = _history(uri, run_id, "sys/gpu_mem_gb")
    assert [s for s, _ in mfu] == [s for s, _ in memory] == list(range(1, steps + 1))
    assert all(0 < v < 1 for _, v in mfu), mfu
    total_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
    assert all(0 < v < total_gb for _, v in memory), memory


# ------------------------------------------------------------------------------------------------ training


def test_mmface_dit_trains_in_bf16_under_deepspeed_and_resumes(ray_local, prepared, tmp_path, mlflow_uri):
    from modeling.checkpoints import WEIGHTS_DIR
    from modeling.weights import load_weights

    common = ("name=gpu-mm", "lr=1e-3", "train.warmup_steps=2")
    first = _train("mmface_dit_tiny.yaml", prepared, tmp_path, *common, "max_steps=10", "ckpt_every=10")
    assert _step_of(first["checkpoint"]) == 10
    second = _train("mmface_dit_tiny.yaml", prepared, tmp_path, *common, "max_steps=30", "ckpt_every=10")
    assert second["mlflow_run_id"] == first["mlflow_run_id"] and _step_of(second["checkpoint"]) == 30
    history = _history(mlflow_uri, second["mlflow_run_id"], "train/loss")
    assert [s for s, _ in history] == list(range(1, 31))  # resumed: each step once
    losses = [v for _, v in history]
    assert all(np.isfinite(losses)) and sum(losses[-5:]) < 0.9 * sum(losses[:5]), losses
    _assert_gpu_metrics(mlflow_uri, second["mlflow_run_id"], 30)
    state, _ = load_weights(Path(second["checkpoint"]) / WEIGHTS_DIR, ema=True)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in state.values())


def test_face_mogle_base_and_lora_stages_train_in_bf16_and_resume(ray_local, prepared, tmp_path, mlflow_uri):
    runs = tmp_path / "runs"
    fast = ("lr=2e-3", "train.warmup_steps=2")
    base = _train("flux_base_tiny.yaml", prepared, tmp_path, *fast, "max_steps=24", "ckpt_every=24")
    losses = [v for _, v in _history(mlflow_uri, base["mlflow_run_id"], "train/loss")]
    assert len(losses) == 24 and sum(losses[-4:]) < 0.9 * sum(losses[:4]), losses
    _assert_gpu_metrics(mlflow_uri, base["mlflow_run_id"], 24)

    lora = ("name=gpu-lora", f"base_from={runs / 'flux-base-tiny'}", *fast)
    first = _train("face_mogle_tiny.yaml", prepared, tmp_path, *lora, "max_steps=6", "ckpt_every=6")
    second = _train("face_mogle_tiny.yaml", prepared, tmp_path, *lora, "max_steps=12", "ckpt_every=6")
    assert second["mlflow_run_id"] == first["mlflow_run_id"] and _step_of(second["checkpoint"]) == 12
    history = _history(mlflow_uri, second["mlflow_run_id"], "train/loss")
    assert [s for s, _ in history] == list(range(1, 13)) and all(np.isfinite([v for _, v in history]))


# ------------------------------------------------------------------------------------------------ generator


@pytest.fixture(scope="module")
def checkpoints(prepared, tmp_path_factory) -> dict:
    """Tiny MMFace-DiT and Face-MoGLE serving weights, perturbed from their initialisation (what the CPU Serve
    tests use), registered in their own MLflow store."""
    from pipelines.train.publish import publish
    from tests.serve.conftest import write_checkpoint

    root = tmp_path_factory.mktemp("gpu-weights")
    runs = root / "runs"
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mm = write_checkpoint(prepared, runs, "mm", "mmface_dit_tiny.yaml", 1)
        base = write_checkpoint(prepared, runs, "base", "flux_base_tiny.yaml", 3)
        mogle = write_checkpoint(prepared, runs, "mogle", "face_mogle_tiny.yaml", 4, f"base_from={base}")
        published = publish("mm", storage=str(runs))
    return {"mmface-dit": mm, "face-mogle": mogle, "uri": uri, "runs": runs, "mm_model": published}


def _face_mask(size: int = 64) -> np.ndarray:
    labels = np.zeros((size, size), np.uint8)
    labels[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    labels[: size // 4, size // 4 : 3 * size // 4] = 13
    return labels


# bf16 autocast against fp32 over 10 sampling steps of these weights, emulated on a CPU (torch.autocast("cpu")):
# mean 0.12-0.26 levels, max 2, 53-57 dB; another seed differs by ~110 levels. Bars with room for CUDA's kernels:
AUTOCAST_MEAN_LEVELS = 1.5  # mean |difference| in 0..255 levels
AUTOCAST_PSNR_DB = 40.0


@pytest.mark.parametrize("arch", ["mmface-dit", "face-mogle"])
def test_generator_bf16_autocast_on_cuda_gives_the_fp32_image(checkpoints, arch):
    from modeling.generator import FaceGenerator, GenerationRequest

    requests = [
        GenerationRequest(prompt="a smiling person with red hair", mask=_face_mask(), seed=3),
        GenerationRequest(prompt="short black hair", seed=4),
    ]
    on_cpu = FaceGenerator(checkpoints[arch], "cpu").generate(requests, steps=10)
    on_gpu = FaceGenerator(checkpoints[arch], "cuda").generate(requests, steps=10)
    other = GenerationRequest(prompt=requests[0].prompt, mask=requests[0].mask, seed=99)
    other_seed = FaceGenerator(checkpoints[arch], "cpu").generate([other], steps=10)
    for fp32, bf16 in zip(on_cpu, on_gpu):
        diff = np.abs(fp32.astype(float) - bf16.astype(float))
        psnr = 10 * np.log10(255**2 / max(np.mean(diff**2), 1e-12))
        assert diff.mean() < AUTOCAST_MEAN_LEVELS and psnr > AUTOCAST_PSNR_DB, (diff.mean(), psnr)
    # and the tolerance is tight enough to tell images apart: another seed is far outside it
    assert np.abs(other_seed[0].astype(float) - on_cpu[0].astype(float)).mean() > 3 * AUTOCAST_MEAN_LEVELS


# ------------------------------------------------------------------------------------------------ serve


def test_a_serve_replica_on_a_gpu_answers(ray_local, checkpoints):
    import base64

    import requests
    from PIL import Image
    from ray import serve

    from modeling.generator import FaceGenerator, GenerationRequest
    from serve.app import build_app
    from tests.serve.conftest import free_port

    port = free_port()
    model = checkpoints["mm_model"]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        settings = {
            "tracking_uri": checkpoints["uri"],
            "default_model": f"{model['registered_model']}/{model['version']}",
            "capacity": {"model_num_gpus": 1.0, "model_num_cpus": 1.0},
            "model_cache": str(checkpoints["runs"].parent / "model-cache"),
        }
        serve.run(build_app(settings), name="faceforge-gpu", route_prefix="/")
        body = {"prompt": "a smiling person with red hair", "seed": 3, "steps": 10, "n": 2}
        answer = requests.post(f"http://127.0.0.1:{port}/v1/generate", json=body, timeout=600)
        assert answer.ok, answer.text
        images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in answer.json()["images"]]
    finally:
        serve.shutdown()
    assert [i.shape for i in images] == [(32, 32, 3)] * 2
    # the replica sampled on the GPU: its image is the CUDA generator's (bf16 autocast), seed for seed
    local = FaceGenerator(checkpoints["mmface-dit"], "cuda").generate(
        [GenerationRequest(prompt=body["prompt"], seed=3), GenerationRequest(prompt=body["prompt"], seed=4)], 10
    )
    for served, direct in zip(images, local):
        assert np.abs(served.astype(int) - direct.astype(int)).max() <= 1


# ------------------------------------------------------------------------------------------------ bench


@pytest.mark.parametrize("model", ["mmface-dit-tiny", "face-mogle-tiny"])
def test_train_step_bench_on_cuda_reports_mfu_and_memory(model, capsys):
    from bench import train_step

    result = train_step.main(["--model", model, "--device", "cuda", "--steps", "3", "--warmup", "1", "--no-sample"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert result["device"] == torch.cuda.get_device_name(0) and result["model"] == model
    assert 0 < result["mfu"] < 1 and result["peak_gib"] > 0 and result["samples_per_s"] > 0
    assert result["optimizer"] == "modeling.optim.AdamW8bit"
