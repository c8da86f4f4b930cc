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
    """A real Ray started once on this machine's cores (tests that need it share it)."""
    import ray

    from pipelines.ray_runtime import quiet_ray_data

    quiet_ray_data()
    if not ray.is_initialized():
        ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


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
