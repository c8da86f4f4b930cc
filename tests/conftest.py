"""Session fixtures: one real local Ray for the whole run, and one synthetic dataset prepared once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".torch_extensions"))


@pytest.fixture(scope="session")
def ray_local():
    """A real Ray started once on this machine's cores (tests that need it share it): a private one, as
    ``faceforge train`` starts, so that Ray Train's placement-group cleaner finds this Ray even while a test's
    subprocess runs another on the same machine."""
    import ray

    from pipelines.ray_runtime import ensure_ray, stop_ray

    def restore(saved: dict) -> None:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    os.environ.pop("RAY_ADDRESS", None)  # never a cluster the environment names: this machine's own Ray
    ensure_ray(num_cpus=os.cpu_count() or 2)
    restore(saved)  # its raylet and workers inherited RAY_ADDRESS naming it; the tests' subprocesses must not join it
    yield ray
    stop_ray()
    restore(saved)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    from pipelines.data.synth import synthesize

    root = tmp_path_factory.mktemp("synth")
    synthesize(root, n=72, size=64, seed=3)
    return root


@pytest.fixture(scope="session")
def prepared(ray_local, synth_root, tmp_path_factory) -> Path:
    """The synthetic faces as 32-px shards for both models (2x2 pixel codec, MiniLM): the tiny presets' data."""
    from pipelines.data.prepare import PrepareOptions, prepare

    out = tmp_path_factory.mktemp("prepared")
    prepare(
        PrepareOptions(
            layout="celebamask-hq", root=str(synth_root), out=str(out), size=32, codec="pixel:2", rows_per_shard=24
        ),
        progress=False,
    )
    return out


# the demo's MMFace-DiT recipe, shortened: 400 faces, a quicker parser, 600 of the demo's 900 steps
SHORT_RECIPE = {"n": 400, "parser_steps": 300, "steps": 600, "eval_n": 32}


@pytest.fixture(scope="session")
def short_recipe(ray_local, tmp_path_factory):
    """Synthetic faces -> prepare -> parser -> MMFace-DiT through the real trainer (2 workers, DeepSpeed, EMA): the
    demo's recipe shortened, shared by the yardstick's tests and the page's first-time flow."""
    from pipelines.data.prepare import PrepareOptions, prepare
    from pipelines.data.synth import synthesize
    from pipelines.demo import CONFIGS
    from pipelines.eval.parser import train_parser
    from pipelines.train.config import load_config
    from pipelines.train.run import train

    root = tmp_path_factory.mktemp("short-recipe")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        synthesize(root / "synth", n=SHORT_RECIPE["n"], size=32, seed=0)
        options = PrepareOptions(
            layout="celebamask-hq",
            root=str(root / "synth"),
            out=str(root / "prepared"),
            size=32,
            codec="pixel:2",
            max_captions=3,
            rows_per_shard=128,
        )
        prepare(options, progress=False)
        parser = train_parser(root / "parser", steps=SHORT_RECIPE["parser_steps"])
        steps = SHORT_RECIPE["steps"]
        overrides = [f"data={root / 'prepared'}", f"storage={root / 'runs'}", "name=mmface-dit-tiny",
                     f"max_steps={steps}", f"ckpt_every={steps}", "sample_every=0"]  # fmt: skip
        train(load_config(CONFIGS / "mmface_dit_tiny.yaml", overrides))
        yield {"root": root, "parser": parser, "uri": f"sqlite:///{root / 'mlflow.db'}"}
