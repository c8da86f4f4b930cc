"""The MLflow model registry as the Serve app sees it: list faceforge models, resolve a reference, fetch weights.

A reference is ``name/version``, ``name@alias`` or ``name`` (its newest version). Resolution always ends at a
concrete ``name/version`` (the multiplexed model id), so a request knows exactly which weights answered it and
an alias can move between requests without mixing versions inside a batch.

Fetching downloads the registered pyfunc model's artifacts (``artifacts/weights``: config.json +
safetensors; ``artifacts/base`` for a Face-MoGLE LoRA on a faceforge-trained base) and never unpickles the
pyfunc itself: the Serve replica loads safetensors only.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from serve.settings import REGISTERED_PREFIX, tracking_uri

_REF = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:/(?P<version>\d+)|@(?P<alias>[A-Za-z0-9_-]+))?$")


class ModelNotFound(LookupError):
    """The reference names no registered model version; the message lists what exists."""


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: int

    @property
    def id(self) -> str:
        return f"{self.name}/{self.version}"

    @classmethod
    def parse_id(cls, model_id: str) -> ModelRef:
        name, _, version = model_id.rpartition("/")
        return cls(name, int(version))


class Registry:
    """Registry lookups with a short cache, so a request costs no database round trip in the common case."""

    def __init__(self, uri: str | None = None, ttl_s: float = 2.0) -> None:
        from mlflow import MlflowClient

        self.uri = tracking_uri(uri)
        self.client = MlflowClient(self.uri, registry_uri=self.uri)
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, ModelRef]] = {}
        self._examples: dict[ModelRef, list[dict]] = {}
        self._lock = threading.Lock()

    def model_names(self) -> list[str]:
        models = self.client.search_registered_models(filter_string=f"name LIKE '{REGISTERED_PREFIX}%'")
        return sorted(m.name for m in models)

    def cached(self, reference: str) -> ModelRef | None:
        """``reference`` resolved less than ``ttl_s`` ago, else None (no database round trip either way)."""
        with self._lock:
            hit = self._cache.get(reference)
        return hit[1] if hit and time.monotonic() - hit[0] < self.ttl_s else None

    def resolve(self, reference: str) -> ModelRef:
        hit = self.cached(reference)
        if hit is not None:
            return hit
        now = time.monotonic()
        ref = self._resolve(reference)
        with self._lock:
            self._cache[reference] = (now, ref)
        return ref

    def _resolve(self, reference: str) -> ModelRef:
        from mlflow.exceptions import MlflowException

        match = _REF.match(reference.strip())
        if not match:
            raise ModelNotFound(f"model {reference!r}: expected name, name/VERSION or name@ALIAS")
        name = match["name"]
        try:
            if match["alias"]:
                version = self.client.get_model_version_by_alias(name, match["alias"]).version
            elif match["version"]:
                version = self.client.get_model_version(name, match["version"]).version
            else:
                versions = self.client.search_model_versions(f"name = '{name}'")
                if not versions:
                    raise ModelNotFound(self._not_found_message(reference, name))
                version = max(int(v.version) for v in versions)
        except MlflowException:
            raise ModelNotFound(self._not_found_message(reference, name)) from None
        return ModelRef(name, int(version))

    def _not_found_message(self, reference: str, name: str) -> str:
        names = self.model_names()
        if name not in names:
            known = ", ".join(names) or "none yet (publish one with `faceforge publish RUN`)"
            return f"unknown model {reference!r}; registered models: {known}"
        model = self.client.get_registered_model(name)
        versions = sorted(int(v.version) for v in self.client.search_model_versions(f"name = '{name}'"))
        if not versions:
            return f"model {name!r} has no versions; publish one with `faceforge publish RUN`"
        aliases = ", ".join(f"@{a}" for a in sorted(getattr(model, "aliases", {}) or {})) or "none"
        return f"unknown version or alias in {reference!r}; {name} has versions {versions} and aliases {aliases}"

    def describe(self, cache_dir: str | Path | None = None) -> list[dict]:
        """Every faceforge registered model with its versions, aliases and what each version accepts; with
        ``cache_dir``, each version's example conditions too (``examples``)."""
        out = []
        for name in self.model_names():
            model = self.client.get_registered_model(name)
            aliases = {alias: int(v) for alias, v in (getattr(model, "aliases", {}) or {}).items()}
            versions = []
            for v in sorted(self.client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version)):
                tags = v.tags or {}
                accepts = tags.get("accepts")
                versions.append(
                    {
                        "version": int(v.version),
                        "id": f"{name}/{v.version}",
                        "aliases": sorted(a for a, n in aliases.items() if n == int(v.version)),
                        "arch": tags.get("arch"),
                        "size": int(tags["size"]) if "size" in tags else None,
                        "accepts": None
                        if accepts is None
                        else {k: k in accepts.split(",") for k in ("text", "mask", "sketch")},
                        "default_steps": int(tags["default_steps"]) if "default_steps" in tags else None,
                        "default_guidance": float(tags["default_guidance"]) if "default_guidance" in tags else None,
                        "text_guidance": float(tags["text_guidance"]) if "text_guidance" in tags else None,
                        "step": int(tags["step"]) if "step" in tags else None,
                    }
                )
                if cache_dir is not None:
                    versions[-1]["examples"] = self.examples(ModelRef(name, int(v.version)), cache_dir)
            out.append({"name": name, "aliases": aliases, "versions": versions})
        return out

    def examples(self, ref: ModelRef, cache_dir: str | Path) -> list[dict]:
        """The version's example conditions as the API shows them (base64 PNG mask and sketch, caption, whether
        it is the default layout); [] for a version published without them. Only the ``examples`` artifact is
        downloaded (a few KiB, never the weights), once per version: a version's artifacts never change."""
        import mlflow.artifacts
        from mlflow.exceptions import MlflowException

        with self._lock:
            hit = self._examples.get(ref)
        if hit is not None:
            return hit
        target = Path(cache_dir) / ref.name / f"{ref.version}-examples"
        if not (target / "examples" / "examples.json").is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{ref.version}-examples-", dir=target.parent))
            source = self.client.get_model_version_download_uri(ref.name, str(ref.version)).rstrip("/")
            try:
                mlflow.artifacts.download_artifacts(
                    artifact_uri=f"{source}/artifacts/examples", dst_path=str(staging), tracking_uri=self.uri
                )
            except (MlflowException, OSError):  # published before examples existed, or by hand
                shutil.rmtree(staging, ignore_errors=True)
                with self._lock:
                    self._examples[ref] = []
                return []
            shutil.rmtree(target, ignore_errors=True)
            try:
                os.rename(staging, target)
            except OSError:
                shutil.rmtree(staging, ignore_errors=True)
        shown = _examples_for_api(target / "examples")
        with self._lock:
            self._examples[ref] = shown
        return shown

    def fetch(self, ref: ModelRef, cache_dir: str | Path) -> tuple[Path, Path | None]:
        """(weights folder, base folder or None) of a model version, downloaded once into ``cache_dir``."""
        import mlflow.artifacts

        target = Path(cache_dir) / ref.name / str(ref.version)
        if not target.is_dir():
            # download beside it, then rename: two replicas filling one cache never see half a model
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{ref.version}-", dir=target.parent))
            source = self.client.get_model_version_download_uri(ref.name, str(ref.version))
            mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(staging), tracking_uri=self.uri)
            try:
                os.rename(staging, target)
            except OSError:  # another replica finished first
                shutil.rmtree(staging, ignore_errors=True)
        return model_artifacts(target, ref.id)


def _examples_for_api(folder: Path) -> list[dict]:
    import base64
    import json

    meta = json.loads((folder / "examples.json").read_text())

    def b64(name: str | None) -> str | None:
        return base64.b64encode((folder / name).read_bytes()).decode() if name else None

    return [
        {
            "index": k,
            "id": str(entry["id"]),
            "caption": entry["caption"],
            "mask": b64(entry["mask"]),
            "sketch": b64(entry.get("sketch")),
            "default_layout": k == meta.get("default_layout"),
        }
        for k, entry in enumerate(meta["examples"])
    ]


def model_artifacts(downloaded: Path, what: str) -> tuple[Path, Path | None]:
    """(weights, base or None) of a downloaded pyfunc model, by the artifact names its MLmodel file records."""
    import yaml

    mlmodel = next(iter(sorted(downloaded.rglob("MLmodel"))), None)
    if mlmodel is None:
        raise FileNotFoundError(f"{what}: no MLmodel file in the registered model; was it logged by faceforge publish?")
    flavor = (yaml.safe_load(mlmodel.read_text()).get("flavors") or {}).get("python_function") or {}
    paths = {key: mlmodel.parent / value["path"] for key, value in (flavor.get("artifacts") or {}).items()}
    weights = paths.get("weights")
    if weights is None or not (weights / "config.json").is_file():
        raise FileNotFoundError(f"{what}: the registered model holds no weights artifact with a config.json")
    base = paths.get("base")
    return weights, base if base is not None and base.is_dir() else None
