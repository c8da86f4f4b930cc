"""The model deployment: registered model versions loaded on demand (multiplexed, LRU) and batched sampling.

One HTTP request of ``n`` images becomes ``n`` items. Items queue per (model version, steps, guidance)
(``serve.batching.Batcher``: a batch starts when the previous one of its queue is done, with what queued
meanwhile), so each batch that reaches ``FaceGenerator.generate`` is exactly one sampler call: one model
version, one step count, one guidance scale. A bad item fails alone: its slot
of the batch carries the exception, the other images of the batch are delivered.

This module imports no torch at import time: the ingress imports it to bind the application, and torch
costs ~700 MiB per process. Sampling runs in a worker thread, so the replica keeps answering health checks
and filling the next batch while a batch samples.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from ray import serve

from serve.batching import Batcher
from serve.registry import ModelRef, Registry
from serve.settings import ServeSettings


@dataclass
class Item:
    """One image to generate (what the ingress sends, decoded and validated)."""

    prompt: str
    mask: object | None  # (H, W) uint8 label map
    sketch: object | None  # (H, W) uint8
    seed: int


@dataclass
class ItemResult:
    png: bytes
    batch_size: int


class GenerationError(ValueError):
    """A request this model cannot serve (e.g. a sketch for Face-MoGLE): the ingress answers 422."""


def model_deployment(settings: ServeSettings):
    """The ``FaceModel`` deployment for these settings (the LRU bound is fixed when the class is made)."""
    capacity = settings.capacity

    @serve.deployment(
        name="FaceModel",
        num_replicas=capacity.model_replicas,
        ray_actor_options={"num_cpus": capacity.model_num_cpus, "num_gpus": capacity.model_num_gpus},
        max_ongoing_requests=capacity.model_max_ongoing,
        max_queued_requests=capacity.model_max_queued,
        health_check_period_s=capacity.health_check_period_s,
    )
    class FaceModel:
        def __init__(self, settings: dict) -> None:
            self.settings = ServeSettings.from_dict(settings)
            self.registry = Registry(self.settings.tracking_uri)
            self.cache_dir = self.settings.model_cache_dir()
            self.device = "cuda" if self.settings.capacity.model_num_gpus > 0 else "cpu"
            self.queues: dict[tuple[str, int, float], Batcher] = {}
            self.replica = serve.get_replica_context().replica_id.unique_id  # answers carry it (X-Replica)

        @serve.multiplexed(max_num_models_per_replica=settings.batching.max_models_per_replica)
        async def get_model(self, model_id: str):
            from modeling.generator import FaceGenerator

            ref = ModelRef.parse_id(model_id)
            weights, base = await asyncio.to_thread(self.registry.fetch, ref, self.cache_dir)
            layout = await asyncio.to_thread(default_layout, weights)
            return await asyncio.to_thread(FaceGenerator, weights, self.device, self.settings.weights, base, layout)

        async def describe(self) -> dict:
            """What the model of the request's multiplexed id accepts (loads it when not loaded yet)."""
            generator = await self.get_model(serve.get_multiplexed_model_id())
            return generator.describe()

        async def generate(self, items: list[Item], steps: int | None, guidance: float | None) -> dict:
            """Images for one request, plus the steps/guidance used and the batch size each image ran in."""
            generator = await self.get_model(serve.get_multiplexed_model_id())
            for item in items:
                try:
                    generator.check(_request(item))
                except ValueError as error:
                    raise GenerationError(str(error)) from None
                if generator.arch == "face-mogle" and item.mask is None and generator.default_layout is None:
                    raise GenerationError(
                        "this Face-MoGLE version has no default face layout (published without example conditions): "
                        "send a mask, or publish it again with `faceforge publish RUN --examples-from PREPARED`"
                    )
            steps = steps or generator.defaults.steps
            # a request's items share their conditions: text alone may guide harder than text with a mask
            guidance = generator.default_guidance(_request(items[0])) if guidance is None else float(guidance)
            queue = self._queue(serve.get_multiplexed_model_id(), steps, guidance)
            results = await asyncio.gather(*(queue(item) for item in items))
            default = [generator.uses_default_layout(_request(item)) for item in items]
            return {"results": results, "steps": steps, "guidance": guidance, "size": generator.size,
                    "default_layout": default, "replica": self.replica}  # fmt: skip

        def _queue(self, model_id: str, steps: int, guidance: float) -> Batcher:
            key = (model_id, steps, guidance)
            if key not in self.queues:
                batching = self.settings.batching

                async def run(items: list[Item]) -> list[ItemResult | Exception]:
                    return await self._run_batch(model_id, items, steps, guidance)

                self.queues[key] = Batcher(run, batching.max_batch_size, batching.batch_wait_timeout_s, str(key))
            return self.queues[key]

        async def _run_batch(
            self, model_id: str, items: list[Item], steps: int, guidance: float
        ) -> list[ItemResult | Exception]:
            generator = await self.get_model(model_id)

            def sample_and_encode() -> list[bytes]:
                # PNG encoding too stays off the event loop: it would hold up the next batch's intake
                images = generator.generate([_request(i) for i in items], steps, guidance)
                return [_png(image) for image in images]

            try:
                pngs = await asyncio.to_thread(sample_and_encode)
            except Exception as error:  # noqa: BLE001 - delivered to every waiting request; the replica lives on
                return [error] * len(items)
            return [ItemResult(png, len(items)) for png in pngs]

    return FaceModel


def default_layout(weights):
    """The default face layout shipped beside a registered version's weights (example 0 of its ``examples``
    artifact, ``modeling.examples``); None for a version published without examples."""
    from modeling.examples import load_examples

    try:
        return load_examples(weights.parent / "examples").layout
    except FileNotFoundError:
        return None


def _request(item: Item):
    from modeling.generator import GenerationRequest

    return GenerationRequest(prompt=item.prompt, mask=item.mask, sketch=item.sketch, seed=item.seed)


def _png(image) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
