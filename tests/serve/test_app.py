"""The Serve application for real: Ray Serve on loopback, the MLflow registry on SQLite, HTTP from the outside.

One application for the whole module (Serve startup costs ~30 s): MMFace-DiT v1/v2 and Face-MoGLE v1 registered,
v1 of MMFace-DiT the default. Limits are set small enough that the tests can cross them.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
from PIL import Image

from modeling.conditions import CELEBAMASK_COLORS, labels_to_color
from tests.serve.conftest import free_port

MM = "faceforge-mmface-dit"
MOGLE = "faceforge-face-mogle"
LIMITS = {"max_n": 4, "max_steps": 40, "max_prompt_chars": 200, "max_body_bytes": 200_000, "max_image_side": 512}
CAPACITY = {"ingress_max_ongoing": 16, "ingress_max_queued": 16, "model_num_cpus": 0.5, "retry_after_s": 1.0}


def settings(registered: dict, default: str) -> dict:
    return {
        "tracking_uri": registered["uri"],
        "default_model": default,
        "limits": LIMITS,
        "capacity": CAPACITY,
        "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.1},
        "model_cache": str(registered["runs"].parent / "model-cache"),
    }


@pytest.fixture(scope="module")
def server(ray_local, registered):
    from ray import serve

    from serve.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(settings(registered, f"{MM}/1")), name="faceforge", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        # first request loads the default model into its replica
        warm = requests.post(f"{url}/v1/generate", json={"prompt": "warm", "steps": 2}, timeout=300)
        assert warm.ok, warm.text
        yield {"url": url, **registered}
    finally:
        serve.shutdown()


def png_b64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def truncated_png_b64(size: int = 64) -> str:
    """A valid base64 string of the first half of a real PNG (a broken upload)."""
    noisy = np.random.default_rng(2).integers(0, 19, (size, size), np.uint8)
    whole = png_b64(noisy)
    return whole[: len(whole) // 8 * 4]


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def face_mask(size: int = 64) -> np.ndarray:
    labels = np.zeros((size, size), np.uint8)
    labels[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1  # skin
    labels[: size // 4, size // 4 : 3 * size // 4] = 13  # hair
    labels[3 * size // 4 :, :] = 18  # cloth
    return labels


def post(url: str, body, **kwargs) -> requests.Response:
    return requests.post(f"{url}/v1/generate", json=body, timeout=300, **kwargs)


# ------------------------------------------------------------------------------------------------ routes


def test_models_health_docs_and_a_png(server):
    url = server["url"]
    assert requests.get(f"{url}/healthz", timeout=30).json() == {"status": "ok"}
    models = requests.get(f"{url}/v1/models", timeout=30).json()
    assert models["default"] == f"{MM}/1"
    by_name = {m["name"]: m for m in models["models"]}
    assert [v["version"] for v in by_name[MM]["versions"]] == [1, 2]
    mm1, mogle1 = by_name[MM]["versions"][0], by_name[MOGLE]["versions"][0]
    assert (mm1["arch"], mm1["size"], mm1["accepts"]) == (
        "mmface-dit",
        32,
        {"text": True, "mask": True, "sketch": True},
    )
    assert mogle1["accepts"] == {"text": True, "mask": True, "sketch": False} and mogle1["default_steps"] == 4
    assert "/v1/generate" in requests.get(f"{url}/openapi.json", timeout=30).json()["paths"]
    assert requests.get(f"{url}/docs", timeout=30).ok

    answer = post(url, {"prompt": "a person with red hair", "seed": 5, "steps": 3, "n": 2}).json()
    assert answer["seeds"] == [5, 6] and answer["model"] == f"{MM}/1" and answer["version"] == 1
    assert [decode(i).shape for i in answer["images"]] == [(32, 32, 3)] * 2
    raw = post(url, {"prompt": "a person with red hair", "seed": 5, "steps": 3}, headers={"Accept": "image/png"})
    assert raw.headers["content-type"] == "image/png" and raw.headers["x-model"] == f"{MM}/1"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(raw.content))), decode(answer["images"][0]))


def test_face_mogle_from_a_mask_and_text_only(server):
    url = server["url"]
    with_mask = post(url, {"model": f"{MOGLE}/1", "prompt": "blond hair", "mask": png_b64(face_mask()), "seed": 1})
    text_only = post(url, {"model": MOGLE, "prompt": "blond hair", "seed": 1})
    assert with_mask.ok and text_only.ok, with_mask.text + text_only.text
    a, b = decode(with_mask.json()["images"][0]), decode(text_only.json()["images"][0])
    assert a.shape == b.shape == (32, 32, 3) and not np.array_equal(a, b)  # the mask reaches the model
    assert with_mask.json()["steps"] == 4  # the model's own sampler setting, recorded at training time


# ------------------------------------------------------------------------------------------------ examples, text only


def _examples(url: str, version_id: str) -> list[dict]:
    models = requests.get(f"{url}/v1/models", timeout=60).json()
    return {v["id"]: v for m in models["models"] for v in m["versions"]}[version_id]["examples"]


def test_every_version_ships_held_out_examples_served_from_the_registry(server, prepared):
    import mlflow.artifacts
    from mlflow import MlflowClient

    from modeling.conditions import mask_to_labels
    from modeling.examples import most_typical
    from pipelines.eval.run import held_out

    url = server["url"]
    ids, labels, _ = held_out(prepared, 256)
    for version_id, takes_sketch in ((f"{MM}/1", True), (f"{MM}/2", True), (f"{MOGLE}/1", False)):
        examples = _examples(url, version_id)
        assert [e["index"] for e in examples] == [0, 1, 2, 3] and all(e["caption"] for e in examples)
        assert [e["default_layout"] for e in examples] == [True, False, False, False]
        assert all((e["sketch"] is not None) == takes_sketch for e in examples)
        for e in examples:  # held-out masks at the model's size, colour-coded
            assert np.array_equal(mask_to_labels(decode(e["mask"])), labels[ids.index(e["id"])])
        assert examples[0]["id"] == ids[most_typical(labels)]  # the default layout: the most typical mask
        # the bytes are the registered version's artifact (downloaded by the server), not a file of the run
        name, version = version_id.split("/")
        source = MlflowClient(server["uri"]).get_model_version_download_uri(name, version)
        folder = Path(mlflow.artifacts.download_artifacts(f"{source}/artifacts/examples", tracking_uri=server["uri"]))
        assert base64.b64decode(examples[1]["mask"]) == (folder / "mask-1.png").read_bytes()


def test_text_only_face_mogle_draws_on_its_default_layout_and_says_so(server):
    url = server["url"]
    layout = _examples(url, f"{MOGLE}/1")[0]["mask"]
    common = {"model": f"{MOGLE}/1", "prompt": "a person with blond hair", "seed": 4, "steps": 3, "n": 2}
    text_only, explicit = post(url, common).json(), post(url, {**common, "mask": layout}).json()
    assert text_only["default_layout"] is True and text_only["layout"] == layout
    assert explicit["default_layout"] is False and explicit["layout"] is None
    assert text_only["images"] == explicit["images"]  # exactly the layout, not an all-background mask
    # the answer states what was used: version, seed per image, steps, guidance
    assert (text_only["model"], text_only["seeds"], text_only["steps"]) == (f"{MOGLE}/1", [4, 5], 3)
    assert text_only["guidance"] == 3.0
    # MMFace-DiT generates from text alone (its spatial condition dropped, as in training): no layout stands in
    mm = post(url, {**common, "model": f"{MM}/1"}).json()
    assert mm["default_layout"] is False and mm["layout"] is None and mm["model"] == f"{MM}/1"
    # ... and guides text alone harder (the recipe's model.sample_text_guidance), as /v1/models says
    listed = {v["id"]: v for m in requests.get(f"{url}/v1/models", timeout=30).json()["models"] for v in m["versions"]}
    listed = listed[f"{MM}/1"]
    assert (listed["default_guidance"], listed["text_guidance"]) == (3.0, 7.0) and mm["guidance"] == 7.0
    assert post(url, {**common, "model": f"{MM}/1", "mask": layout}).json()["guidance"] == 3.0
    raw = post(url, {**common, "n": 1}, headers={"Accept": "image/png"})
    assert raw.headers["x-default-layout"] == "true"


def test_generate_example_k_sends_that_examples_mask_and_caption(server, tmp_path):
    from serve.client import ClientError, generate

    url = server["url"]
    example = _examples(url, f"{MOGLE}/1")[1]
    answer = generate(url, tmp_path / "faces", model=MOGLE, example=1, seed=3, steps=3)
    direct = post(url, {"model": f"{MOGLE}/1", "prompt": example["caption"], "mask": example["mask"], "seed": 3,
                        "steps": 3}).json()  # fmt: skip
    assert answer["model"] == f"{MOGLE}/1" and not answer["default_layout"]
    assert (tmp_path / "faces" / "3.png").read_bytes() == base64.b64decode(direct["images"][0])
    with pytest.raises(ClientError, match=r"--example 9: faceforge-face-mogle/1 has examples 0\.\.3"):
        generate(url, tmp_path / "faces", model=MOGLE, example=9)


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b"{not json", 422, "JSON"),
        (b"", 422, "body"),
        (b"[1, 2]", 422, "object"),
        ({"prompt": "x", "model": "faceforge-nope"}, 404, "registered models: faceforge-face-mogle"),
        ({"prompt": "x", "model": f"{MM}/9"}, 404, "versions [1, 2]"),
        ({"prompt": "x", "model": f"{MM}@nope"}, 404, "aliases"),
        ({"prompt": "x", "mask": "!!!not base64!!!"}, 422, "mask: not valid base64"),
        ({"prompt": "x", "mask": base64.b64encode(b"GIF89a-not-a-png").decode()}, 422, "not a PNG"),
        ({"prompt": "x", "mask": truncated_png_b64()}, 422, "mask: the PNG is damaged or truncated"),
        ({"prompt": "x", "sketch": truncated_png_b64()}, 422, "sketch: the PNG is damaged or truncated"),
        ({"prompt": "x", "mask": png_b64(np.full((8, 8), 25, np.uint8))}, 422, "25"),
        ({"prompt": "x", "mask": png_b64(np.full((8, 8, 3), (10, 250, 90), np.uint8))}, 422, "(10,250,90)"),
        ({"prompt": "x", "n": 5}, 422, "n=5 is over the limit of 4"),
        ({"prompt": "x", "n": 0}, 422, "n"),
        ({"prompt": "x", "steps": 41}, 422, "steps=41"),
        ({"prompt": "x" * 201}, 422, "201 characters"),
        ({"prompt": "x", "seed": -1}, 422, "seed"),
        ({"prompt": "x", "guidance": "lots"}, 422, "guidance"),
        ({"prompt": "x", "colour": "red"}, 422, "colour"),
        ({"prompt": "x", "model": MOGLE, "sketch": png_b64(np.full((8, 8), 255, np.uint8))}, 422, "not a sketch"),
        ({"prompt": "x", "mask": png_b64(np.zeros((600, 600), np.uint8))}, 422, "512 px limit"),
        ({"prompt": "x", "mask": png_b64(np.random.default_rng(0).integers(0, 255, (300, 300, 3), np.uint8))}, 413,
         "body over 200000 bytes"),
    ],
)  # fmt: skip
def test_bad_input_gets_a_4xx_that_says_what_to_fix(server, body, status, words):
    url = server["url"]
    if isinstance(body, bytes):
        response = requests.post(
            f"{url}/v1/generate", data=body, headers={"Content-Type": "application/json"}, timeout=60
        )
    else:
        response = post(url, body)
    assert response.status_code == status, response.text
    assert words in response.json()["detail"], response.json()


def test_a_mask_of_another_size_is_resized_and_colour_masks_equal_label_maps(server):
    url = server["url"]
    labels = face_mask(128)
    common = {"prompt": "short black hair", "seed": 3, "steps": 3}
    by_labels = post(url, {**common, "mask": png_b64(labels)})
    by_colours = post(url, {**common, "mask": png_b64(labels_to_color(labels))})
    assert by_labels.ok and by_colours.ok
    assert by_labels.json()["images"] == by_colours.json()["images"]
    assert decode(by_labels.json()["images"][0]).shape == (32, 32, 3)
    # a JPEG-ish colour mask: palette colours off by a few levels still read as their classes (the same image)
    noisy = labels_to_color(labels).astype(int) + np.random.default_rng(1).integers(-9, 10, (128, 128, 3))
    by_noisy = post(url, {**common, "mask": png_b64(np.clip(noisy, 0, 255).astype(np.uint8))})
    assert by_noisy.ok and by_noisy.json()["images"] == by_colours.json()["images"]


# ------------------------------------------------------------------------------------------------ batching


def _all_at_once(url: str, bodies: list) -> list[requests.Response]:
    """POSTs ``bodies`` from one thread each, every thread released at the same moment (a barrier), so the
    requests meet the server together however slowly the threads start on a loaded machine."""
    start = threading.Barrier(len(bodies))

    def send(body):
        start.wait()
        return post(url, body)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(send, bodies))


def test_concurrent_requests_share_batches_and_images_do_not_depend_on_the_batch(server):
    url = server["url"]
    bodies = [
        {"prompt": f"person number {i} with long {colour} hair", "seed": 100 + i, "steps": 6}
        for i, colour in enumerate(["red", "black", "blond", "gray"])
    ]
    alone = [post(url, body).json() for body in bodies]  # one at a time: batches of one
    assert [a["batch_size"] for a in alone] == [1] * 4
    assert post(url, bodies[0]).json()["images"] == alone[0]["images"]  # byte-identical PNG

    answers = _all_at_once(url, bodies * 4)
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if not a.ok]
    sizes = [a.json()["batch_size"] for a in answers]
    # 16 requests at once to one replica: whatever arrives while a batch samples waits for the next one
    assert max(sizes) > 1, sizes
    for k, answer in enumerate(answers):
        got, reference = decode(answer.json()["images"][0]), decode(alone[k % 4]["images"][0])
        diff = np.abs(got.astype(int) - reference.astype(int)).max()
        assert diff <= 1, f"request {k % 4} alone and in a batch of {sizes[k]} differs by {diff}"


def test_overload_gets_503_with_retry_after_then_the_server_recovers(server):
    url = server["url"]
    # 64 slow requests released together against 16 ongoing + 16 queued places: at least 32 must be refused
    answers = _all_at_once(url, [{"prompt": "busy", "steps": 40, "n": 4}] * 64)
    codes = [a.status_code for a in answers]
    rejected = [a for a in answers if a.status_code in (429, 503)]
    assert rejected and all(int(a.headers["Retry-After"]) >= 1 for a in rejected), codes
    assert set(codes) <= {200, 429, 503}, codes
    assert post(url, {"prompt": "calm again", "steps": 2}).ok


# ------------------------------------------------------------------------------------------------ hot swap


def test_hot_swap_of_the_default_model_fails_no_request(server):
    from ray import serve

    from serve.app import build_app

    url = server["url"]
    stop = threading.Event()
    results: list[tuple[float, float, requests.Response]] = []  # (sent, answered, response)

    def keep_asking():
        while not stop.is_set():
            sent = time.monotonic()
            response = post(url, {"prompt": "swap", "steps": 2})
            results.append((sent, time.monotonic(), response))

    def switched() -> float | None:
        """When v2 first answered."""
        by_v2 = [answered for _, answered, r in list(results) if r.ok and r.json()["version"] == 2]
        return min(by_v2, default=None)

    def asked_since_the_switch() -> list[requests.Response]:
        at = switched()
        return [] if at is None else [r for sent, _, r in list(results) if sent > at]

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(keep_asking) for _ in range(3)]
        while not results and not any(f.done() for f in futures):  # the old default answers first
            time.sleep(0.1)
        serve.run(build_app(settings(server, f"{MM}/2")), name="faceforge", route_prefix="/")
        # the event: three requests sent after v2 first answered are answered (the stop-gap bounds a hung swap)
        deadline = time.monotonic() + 300
        while len(asked_since_the_switch()) < 3 and time.monotonic() < deadline and not any(f.done() for f in futures):
            time.sleep(0.2)
        stop.set()
        for f in futures:
            f.result()
    assert results and all(r.status_code == 200 for _, _, r in results), [r.text for _, _, r in results if not r.ok]
    assert min(results, key=lambda r: r[0])[2].json()["version"] == 1
    after = [r.json()["version"] for r in asked_since_the_switch()]
    assert len(after) >= 3 and set(after) == {2}, after  # once v2 answered, the old version never answers again
    assert post(url, {"prompt": "after", "steps": 2}).json()["model"] == f"{MM}/2"
    assert requests.get(f"{url}/v1/models", timeout=30).json()["default"] == f"{MM}/2"


# ------------------------------------------------------------------------------------------------ the page


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_the_page_generates_a_face_from_a_prompt_and_an_uploaded_mask(server, tmp_path):
    if not _chromium():
        pytest.skip("no chromium: `make test` installs Debian's chromium when run as root (apt-get)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency (make test)")
    mask_file = tmp_path / "mask.png"
    Image.fromarray(labels_to_color(face_mask())).save(mask_file)
    args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"]  # fmt: skip
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), headless=True, args=args)
        try:
            page = browser.new_page()
            page.goto(server["url"] + "/")
            page.wait_for_function("document.querySelectorAll('#model option').length > 1")
            assert f"{MM}/2" in page.inner_text("#model")
            page.fill("#prompt", "A smiling person with short red hair, against a blue background.")
            page.set_input_files("#mask-file", str(mask_file))
            page.fill("#n", "2")
            page.fill("#steps", "3")
            page.fill("#seed", "42")
            page.click("#generate")
            page.wait_for_selector("#gallery figure img", timeout=120_000)
            assert page.locator("#gallery figure").count() == 2
            assert "seed 42" in page.inner_text("#gallery") and "seed 43" in page.inner_text("#gallery")
            src = page.get_attribute("#gallery figure img", "src")
            assert decode(src.split(",", 1)[1]).shape == (32, 32, 3)
            # painting on the canvas sends only palette colours: the server accepts the painted mask
            page.click("#palette button[data-label='13']")
            box = page.locator("#mask-canvas").bounding_box()
            page.mouse.move(box["x"] + 20, box["y"] + 20)
            page.mouse.down()
            page.mouse.move(box["x"] + 120, box["y"] + 60, steps=8)
            page.mouse.up()
            page.click("#generate")
            page.wait_for_function("document.querySelectorAll('#gallery figure').length >= 4", timeout=120_000)
            assert "error" not in (page.get_attribute("#status", "class") or "")
        finally:
            browser.close()


# ------------------------------------------------------------------------------------------------ CLI


EXIT_LIMIT_S = 45  # Ctrl-C to exit, and its Ray gone: three times the 15 s a loaded 2-core machine sometimes missed


@pytest.mark.slow
def test_faceforge_serve_and_generate_then_ctrl_c_leaves_nothing_running(server, tmp_path):
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": server["uri"], "FACEFORGE_API_TOKEN": "s3cret"}
    env.pop("RAY_ADDRESS", None)
    faceforge = [sys.executable, "-m", "pipelines"]
    proc = subprocess.Popen(
        [*faceforge, "serve", "--port", str(port), "--model", f"{MM}/2", "--num-cpus", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    lines = []
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "serving on" in line or proc.poll() is not None:
                break
        assert "serving on" in lines[-1], "".join(lines)
        url = f"http://127.0.0.1:{port}"
        assert requests.get(f"{url}/v1/models", timeout=30).status_code == 401
        assert requests.get(f"{url}/healthz", timeout=30).ok
        out = tmp_path / "faces"
        mask = tmp_path / "mask.png"
        Image.fromarray(face_mask()).save(mask)
        done = subprocess.run(
            [*faceforge, "generate", "--url", url, "--prompt", "grey hair", "--mask", str(mask), "--n", "2",
             "--seed", "7", "--steps", "2", "--out", str(out), "--token", "s3cret"],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert sorted(p.name for p in out.iterdir()) == ["7.png", "8.png"]
        assert json.loads(done.stdout)["model"] == f"{MM}/2"
        refused = subprocess.run(
            [*faceforge, "generate", "--url", url, "--prompt", "x", "--out", str(out)],
            env={**env, "FACEFORGE_API_TOKEN": ""}, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert refused.returncode == 1 and "401" in refused.stderr

        ray_processes = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(p.name() for p in ray_processes)
        assert "raylet" in names and "gcs_server" in names, names  # its own Ray, started by the command
        started = time.time()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=EXIT_LIMIT_S)
        took = time.time() - started
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert took < EXIT_LIMIT_S and proc.returncode == 0
    _, survivors = psutil.wait_procs(ray_processes, timeout=EXIT_LIMIT_S)  # returns once they are gone
    survivors = [p for p in survivors if p.status() != psutil.STATUS_ZOMBIE]
    assert not survivors, f"Ray processes outlived faceforge serve: {survivors}"


def test_serve_yaml_is_a_valid_serve_config_for_this_app():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serve.settings import ServeSettings

    root = Path(__file__).resolve().parents[2]
    config = yaml.safe_load((root / "cluster" / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.import_path == "serve.app:build_app"
    ServeSettings.from_dict(app.args)  # every key known
    ingress = {d.name: d for d in app.deployments}["FaceforgeIngress"]
    assert ingress.user_config["default_model"]
    assert config["http_options"]["port"]
    service = yaml.safe_load((root / "cluster" / "rayservice.yaml").read_text())
    assert service["kind"] == "RayService" and service["apiVersion"] == "ray.io/v1"
    assert yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["import_path"] == app.import_path
    with pytest.raises(ValueError, match="unknown limits keys"):
        ServeSettings.from_dict({"limits": {"max_images": 3}})


def test_colour_table_matches_the_page():
    page = (Path(__file__).resolve().parents[2] / "serve" / "page.html").read_text()
    for colour in CELEBAMASK_COLORS.tolist():
        assert f"[{colour[0]}, {colour[1]}, {colour[2]}]" in page
