"""What a first-time user meets: the page in Chromium, both demo models trained for real, faces judged by the parser.

The shortened demo recipe (``short_recipe``: synthetic faces, the synthetic parser, MMFace-DiT 600 steps) plus the
Face-MoGLE stage-1 model (the tiny FLUX base with MoGLE, ``flux_base_tiny.yaml``) trained briefly, both published
(examples drawn from their held-out data) and served with no default configured: the page opens on Face-MoGLE.
A generated image "is a face" when the synthetic parser finds skin, hair and a face-sized foreground in it; for an
example, the classes it finds must cover the example's face region.
"""

from __future__ import annotations

import base64
import io
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.serve.conftest import free_port

MM, MOGLE = "faceforge-mmface-dit", "faceforge-face-mogle"
BASE_STEPS = 500  # Face-MoGLE stage 1: mask mIoU ~0.3, hair and background colour > 0.5 by here (time to quality)
PROMPT = "A smiling person with long red hair, wearing a blue shirt, against a green background."
COVERAGE = 0.7  # share of an example's face region the parser must find as face in the generated image


@pytest.fixture(scope="module")
def demo_server(short_recipe, ray_local):
    from ray import serve

    from modeling.judges.synthetic_parser import load_parser
    from pipelines.demo import CONFIGS
    from pipelines.train.config import load_config
    from pipelines.train.publish import publish
    from pipelines.train.run import train
    from serve.app import build_app

    root = short_recipe["root"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", short_recipe["uri"])
        overrides = [f"data={root / 'prepared'}", f"storage={root / 'runs'}", "name=flux-base-tiny",
                     f"max_steps={BASE_STEPS}", f"ckpt_every={BASE_STEPS}", "sample_every=0"]  # fmt: skip
        train(load_config(CONFIGS / "flux_base_tiny.yaml", overrides))
        for run in ("mmface-dit-tiny", "flux-base-tiny"):
            publish(run, storage=str(root / "runs"), alias="demo")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        settings = {"tracking_uri": short_recipe["uri"], "capacity": {"model_num_cpus": 0.5},
                    "model_cache": str(root / "model-cache")}  # fmt: skip
        serve.run(build_app(settings), name="faceforge-first-time", route_prefix="/")
        yield {"url": f"http://127.0.0.1:{port}", "parser": load_parser(root / "parser")}
    finally:
        serve.shutdown()


def decode(src: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[-1]))).convert("RGB"))


def parse(parser, images: list[np.ndarray]) -> np.ndarray:
    import torch

    return parser.parse(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)).numpy()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_first_time_flow_in_chromium_draws_faces_with_both_demo_models(demo_server):
    if not _chromium():
        pytest.skip("no chromium: `make test` installs Debian's chromium when run as root (apt-get)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency (make test)")
    from modeling.conditions import mask_to_labels
    from pipelines.eval.yardstick import face_coverage, is_face

    parser = demo_server["parser"]
    args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"]  # fmt: skip
    report = {}
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), headless=True, args=args)
        try:
            page = browser.new_page()
            page.goto(demo_server["url"] + "/")
            # the page opens with an example of the default model (Face-MoGLE) chosen: a layout and a caption
            page.wait_for_selector("#mask-canvas[data-example='0']")
            assert page.input_value("#prompt") and page.is_checked("#use-mask")
            assert "#0 mask (default)" in page.inner_text("#examples .example.active")
            page.fill("#n", "2")
            page.fill("#seed", "7")

            def generate(expected: int) -> list[np.ndarray]:
                page.click("#generate")
                page.wait_for_function(f"document.querySelectorAll('#gallery figure').length >= {expected}",
                                       timeout=120_000)  # fmt: skip
                assert "error" not in (page.get_attribute("#status", "class") or ""), page.inner_text("#status")
                srcs = page.eval_on_selector_all("#gallery figure > img", "els => els.map(e => e.src)")
                return [decode(s) for s in srcs[:2]]  # the newest request's images come first

            shown = 0
            for model in (MOGLE, MM):
                page.select_option("#model", f"{model}/1")
                example = page.locator("#examples .example[data-index='1'][data-kind='mask']")
                example.click()
                page.wait_for_selector("#mask-canvas[data-example='1']")
                caption = page.input_value("#prompt")
                mask = mask_to_labels(decode(example.locator("img").get_attribute("src")))
                assert caption and page.is_checked("#use-mask")
                shown += 2
                faces = generate(shown)
                parsed = parse(parser, faces)
                coverage = [face_coverage(p, mask) for p in parsed]
                report[f"{model} example 1"] = (coverage, [is_face(p) for p in parsed])
                assert all(is_face(p) for p in parsed) and min(coverage) >= COVERAGE, report
                text = page.inner_text("#gallery figure")
                assert f"{model}/1" in text and "seed 7" in text and caption in text

                # text alone: no mask on the canvas, the prompt
                page.uncheck("#use-mask")
                page.fill("#prompt", PROMPT)
                shown += 2
                faces = generate(shown)
                parsed = parse(parser, faces)
                report[f"{model} text only"] = [is_face(p) for p in parsed]
                assert all(is_face(p) for p in parsed), report
                said = page.inner_text("#gallery figure")
                assert ("default layout" in said) == (model == MOGLE), said

            # download and re-run with the same seed: the same image again
            first = page.locator("#gallery figure").first
            src = first.locator("img").first.get_attribute("src")
            assert first.locator("a.download").get_attribute("href") == src
            assert first.locator("a.download").get_attribute("download").endswith(".png")
            first.locator("button.rerun").click()
            page.wait_for_function(f"document.querySelectorAll('#gallery figure').length >= {shown + 1}",
                                   timeout=60_000)  # fmt: skip
            assert page.locator("#gallery figure").first.locator("img").first.get_attribute("src") == src
        finally:
            browser.close()
    print("\nfirst-time flow (coverage, is_face):", report)
