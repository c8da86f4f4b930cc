"""The Serve application's settings: where the registry is, which model answers by default, and the limits.

Every limit is enforced by the app itself and answered with a 4xx that says what to fix. The settings come
from ``serve run``/``serve deploy`` (``cluster/serve.yaml``: the application's ``args``), from
``faceforge serve`` flags, or from the defaults below; ``default_model`` can also change at run time through
the ingress deployment's ``user_config`` (hot swap without a restart).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from modeling import storage

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
REGISTERED_PREFIX = "faceforge-"  # registered models faceforge publishes: faceforge-mmface-dit, faceforge-face-mogle
TOKEN_ENV = "FACEFORGE_API_TOKEN"


def tracking_uri(uri: str | None = None) -> str:
    """``uri``, else ``MLFLOW_TRACKING_URI``, else the embedded SQLite store; a relative SQLite path is made
    absolute so that processes started elsewhere (Ray workers, Serve replicas) open the same file."""
    uri = storage.absolute_sqlite_uri(uri or os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI))
    database = storage.sqlite_database(uri)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
    return uri


def check_tracking_server(uri: str, timeout_s: float = 5.0) -> None:
    """A tracking server (``http(s)://``) answers its health check, else one line naming the URI: MLflow's own
    client would retry for minutes before failing with a traceback."""
    import urllib.error
    import urllib.request

    if not storage.is_http(uri):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as answer:
            answer.read()
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise ConnectionError(
            f"the MLflow tracking server {uri} does not answer ({reason}); start it (`mlflow server ... "
            "--serve-artifacts`, see the README's 'Storage and tracking on a cluster') or fix MLFLOW_TRACKING_URI"
        ) from None


@dataclass
class Limits:
    max_body_bytes: int = 8 * 2**20  # whole request, base64 images included (413 above)
    max_n: int = 8  # images per request
    max_steps: int = 100
    max_prompt_chars: int = 1000
    max_image_side: int = 2048  # uploaded mask / sketch, pixels per side
    max_guidance: float = 30.0


@dataclass
class Batching:
    max_batch_size: int = 8  # images per sampler call
    # how long a lone request waits for company; under load batches fill from the queue anyway
    batch_wait_timeout_s: float = 0.01
    max_models_per_replica: int = 2  # model versions kept loaded per replica (LRU)


@dataclass
class Capacity:
    """Ray Serve's admission limits; above them a request gets 503 with ``Retry-After``."""

    ingress_max_ongoing: int = 64
    ingress_max_queued: int = 64
    model_max_ongoing: int = 64
    model_max_queued: int = 64
    retry_after_s: float = 2.0
    model_replicas: int = 1
    model_num_cpus: float = 1.0
    model_num_gpus: float = 0.0
    # a model replica that dies is noticed at its next health check and replaced; a request in flight on it is
    # retried on another replica up to ``replica_retries`` times, then answered 503 with ``Retry-After``
    health_check_period_s: float = 10.0
    replica_retries: int = 2


@dataclass
class ServeSettings:
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI or the embedded store
    default_model: str | None = None  # "name/version" | "name@alias" | "name" (its newest version)
    weights: str = "auto"  # ema | raw | auto (EMA when the checkpoint has it)
    # where replicas unpack registered models (None: ~/.cache/faceforge/models/<registry>); a version's
    # artifacts never change, so a restart reuses what an earlier run downloaded
    model_cache: str | None = None
    limits: Limits = field(default_factory=Limits)
    batching: Batching = field(default_factory=Batching)
    capacity: Capacity = field(default_factory=Capacity)

    @classmethod
    def from_dict(cls, values: dict | None) -> ServeSettings:
        """From the nested dict of a Serve config's ``args``; unknown keys are an error naming them."""
        values = dict(values or {})
        sections = {"limits": Limits, "batching": Batching, "capacity": Capacity}
        kwargs = {}
        for key, value in values.items():
            if key in sections:
                known = {f.name for f in dataclasses.fields(sections[key])}
                unknown = set(value or {}) - known
                if unknown:
                    raise ValueError(f"serve settings: unknown {key} keys {sorted(unknown)}; known: {sorted(known)}")
                kwargs[key] = sections[key](**(value or {}))
            elif key in {f.name for f in dataclasses.fields(cls)}:
                kwargs[key] = value
            else:
                raise ValueError(f"serve settings: unknown key {key!r}")
        settings = cls(**kwargs)
        if settings.weights not in ("auto", "ema", "raw"):
            raise ValueError(f"serve settings: weights={settings.weights!r}; choose ema, raw or auto")
        return settings

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def model_cache_dir(self) -> Path:
        if self.model_cache:
            return Path(self.model_cache)
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        registry = hashlib.sha1(tracking_uri(self.tracking_uri).encode()).hexdigest()[:12]
        return root / "faceforge" / "models" / registry
