"""The faceforge Ray Serve application: a FastAPI ingress in front of the ``FaceModel`` deployment.

Routes: ``POST /v1/generate``, ``GET /v1/models``, ``GET /healthz``, the page at ``/`` and the OpenAPI docs
at ``/docs``. The ingress validates everything before a model sees it (body size, JSON shape, limits, PNG
decoding, mask colours and labels) and answers bad input with a 4xx that says what to fix; it resolves the
model reference to a concrete ``name/VERSION`` and routes the request to a replica holding that version.

``build_app(args)`` is the application builder for ``serve run serve.app:build_app`` / ``serve deploy
cluster/serve.yaml`` (``args`` = ``ServeSettings`` as a dict). The default model is the ingress deployment's
``user_config`` (``{"default_model": "name@alias"}``): changing it calls ``reconfigure`` in place.

No torch is imported here: the ingress replica stays small. No ``from __future__ import annotations`` either:
Serve rebuilds the route signatures of the class, and FastAPI must see the real annotation objects.
"""

import asyncio
import base64
import binascii
import hmac
import io
import logging
import os
import random
import time
from pathlib import Path

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from modeling.conditions import MaskError, as_sketch, mask_to_labels
from serve.model import GenerationError, Item, model_deployment
from serve.registry import ModelNotFound, Registry
from serve.schemas import GenerateRequest, GenerateResponse, ModelsResponse
from serve.settings import TOKEN_ENV, Limits, ServeSettings, tracking_uri

PAGE = Path(__file__).with_name("page.html")
logger = logging.getLogger("ray.serve")

api = FastAPI(
    title="faceforge",
    version="1",
    description="Generate faces from text, a 19-class mask, a sketch, or a mix, with registered faceforge models.",
)


class BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes gets 413 before it is read into memory. The ingress sets
    ``limit`` from its settings when its replica starts (the app object is built at import, in each replica)."""

    limit = Limits().max_body_bytes

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _too_large(self.limit, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge
            return message

        try:
            return await self.app(scope, counted, send)
        except _BodyTooLarge:
            return await _too_large(self.limit, send)


class _BodyTooLarge(Exception):
    pass


async def _too_large(limit: int, send) -> None:
    body = f'{{"detail": "request body over {limit} bytes; send smaller images (PNG) or fewer of them"}}'.encode()
    await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


api.add_middleware(BodyLimit)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = []
    for e in error.errors():
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        problems.append(f"{where}: {e.get('msg', 'invalid')}")
    hint = 'send a JSON object such as {"prompt": "a smiling woman with red hair", "n": 1}'
    return JSONResponse({"detail": "; ".join(problems) + f" ({hint})"}, status_code=422)


async def _bearer_token(request: Request) -> None:
    """With FACEFORGE_API_TOKEN set on the server, every /v1 route needs ``Authorization: Bearer <token>``. An
    ``async def``: FastAPI would run a plain function in its thread pool, a thread hop per request for a compare."""
    expected = os.environ.get(TOKEN_ENV)
    if not expected:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected.encode()):
        raise HTTPException(401, "missing or wrong API token: send 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})  # fmt: skip


def decode_png(data: str, field: str, limits: Limits) -> np.ndarray:
    """A base64 PNG from the request as an array; 422 naming the field and the problem otherwise."""
    from PIL import Image, UnidentifiedImageError

    try:
        raw = base64.b64decode(data.split(",", 1)[1] if data.startswith("data:") else data, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(422, f"{field}: not valid base64; send the PNG file's bytes base64-encoded") from None
    if not raw.startswith(b"\x89PNG\r\n\x1a\n"):
        raise HTTPException(422, f"{field}: not a PNG image (other formats are not accepted for masks/sketches)")
    try:
        image = Image.open(io.BytesIO(raw))
        if max(image.size) > limits.max_image_side:
            raise HTTPException(
                422, f"{field}: {image.size[0]}x{image.size[1]} is over the {limits.max_image_side} px limit"
            )
        image.load()
    except HTTPException:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise HTTPException(422, f"{field}: the PNG is damaged or truncated ({error})") from None
    if image.mode not in ("L", "RGB", "RGBA", "P", "I", "I;16", "LA"):
        image = image.convert("RGB")
    elif image.mode == "P":
        image = image.convert("RGB")
    elif image.mode == "LA":
        image = image.convert("L")
    return np.asarray(image)


def _conditions(body: GenerateRequest, limits: Limits):
    """(label map or None, sketch or None) from the request's base64 PNGs; 422 naming what is wrong."""
    mask = sketch = None
    if body.mask:
        try:
            mask = mask_to_labels(decode_png(body.mask, "mask", limits))
        except MaskError as error:
            raise HTTPException(422, f"mask: {error}") from None
    if body.sketch:
        sketch = as_sketch(decode_png(body.sketch, "sketch", limits))
    return mask, sketch


@serve.ingress(api)
class FaceforgeIngress:
    def __init__(self, model: DeploymentHandle, settings: dict) -> None:
        self.settings = ServeSettings.from_dict(settings)
        BodyLimit.limit = self.settings.limits.max_body_bytes
        self.model = model
        self.registry = Registry(self.settings.tracking_uri)
        self.default_reference = self.settings.default_model
        self.page = PAGE.read_text(encoding="utf-8") if PAGE.is_file() else "<h1>faceforge</h1>"

    def reconfigure(self, user_config: dict) -> None:
        """``user_config`` = ``{"default_model": "name/VERSION" | "name@alias" | "name"}``: hot swap in place."""
        if user_config and user_config.get("default_model"):
            self.default_reference = str(user_config["default_model"])

    def _default(self) -> str:
        if self.default_reference:
            return self.default_reference
        names = self.registry.model_names()
        if not names:
            raise HTTPException(404, "no model is registered yet; train one and run `faceforge publish RUN`")
        return names[0]

    def _resolve(self, reference: str | None):
        try:
            return self.registry.resolve(reference or self._default())
        except ModelNotFound as error:
            raise HTTPException(404, str(error)) from None

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(self.page)

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/models", response_model=ModelsResponse, dependencies=[Depends(_bearer_token)])
    async def models(self) -> dict:
        return await asyncio.to_thread(self._models)

    def _models(self) -> dict:
        try:
            default = self._resolve(None).id
        except HTTPException:
            default = None
        return {
            "default": default,
            "default_reference": self.default_reference,
            "models": self.registry.describe(self.settings.model_cache_dir()),
            "limits": self.settings.limits.__dict__,
        }

    def _layout(self, ref) -> str | None:
        shown = self.registry.examples(ref, self.settings.model_cache_dir())
        return next((e["mask"] for e in shown if e["default_layout"]), None)

    async def _generate(self, model_id: str, items: list[Item], steps: int | None, guidance: float | None):
        """The model deployment's answer and how many times the request was sent again. A replica that dies
        with the request in flight (SIGKILL, lost node, OOM) raises ``ActorDiedError``, or
        ``ActorUnavailableError`` while its death is not yet known; both are ``RayActorError``. Serve retries
        only requests that no replica accepted yet, so an accepted one is sent again here: generation is seeded,
        so a second run gives the same images. When no replica takes it, 503 with ``Retry-After``, never a 500."""
        capacity = self.settings.capacity
        busy = {"Retry-After": str(max(1, round(capacity.retry_after_s)))}
        handle = self.model.options(multiplexed_model_id=model_id)
        for attempt in range(capacity.replica_retries + 1):
            try:
                return await handle.generate.remote(items, steps, guidance), attempt
            except GenerationError as error:
                raise HTTPException(422, str(error)) from None
            except BackPressureError:
                raise HTTPException(503, "the model is busy: too many requests queued; retry shortly",
                                    headers=busy) from None  # fmt: skip
            except RayActorError as error:
                logger.warning("a model replica died with a request in flight (%s); attempt %d of %d",
                               type(error).__name__, attempt + 1, capacity.replica_retries + 1)  # fmt: skip
        raise HTTPException(503, "the model replicas died while generating; retry shortly", headers=busy)

    @api.post(
        "/v1/generate",
        response_model=GenerateResponse,
        dependencies=[Depends(_bearer_token)],
        responses={200: {"content": {"image/png": {}}, "description": "JSON, or the PNG itself for n=1 and "
                                                                      "Accept: image/png"}},
    )  # fmt: skip
    async def generate(self, body: GenerateRequest, request: Request):
        limits = self.settings.limits
        problems = []
        if body.n > limits.max_n:
            problems.append(f"n={body.n} is over the limit of {limits.max_n} images per request")
        if body.steps is not None and body.steps > limits.max_steps:
            problems.append(f"steps={body.steps} is over the limit of {limits.max_steps}")
        if body.guidance is not None and body.guidance > limits.max_guidance:
            problems.append(f"guidance={body.guidance} is over the limit of {limits.max_guidance}")
        if len(body.prompt) > limits.max_prompt_chars:
            problems.append(f"prompt has {len(body.prompt)} characters, over the limit of {limits.max_prompt_chars}")
        if problems:
            raise HTTPException(422, "; ".join(problems))
        # decoding (up to max_image_side²) and a registry lookup that misses the cache block: off the event loop,
        # so requests in flight keep moving; text alone and a cached reference need no thread hop
        mask, sketch = await asyncio.to_thread(_conditions, body, limits) if body.mask or body.sketch else (None, None)
        reference = body.model or self.default_reference
        ref = (reference and self.registry.cached(reference)) or await asyncio.to_thread(self._resolve, body.model)
        seed = body.seed if body.seed is not None else random.randrange(2**31 - body.n)
        seeds = [seed + i for i in range(body.n)]
        items = [Item(prompt=body.prompt, mask=mask, sketch=sketch, seed=s) for s in seeds]
        started = time.perf_counter()
        out, retries = await self._generate(ref.id, items, body.steps, body.guidance)
        sizes = [r.batch_size for r in out["results"]]
        pngs = [r.png for r in out["results"]]
        headers = {"X-Model": ref.id, "X-Seed": str(seeds[0]), "X-Batch-Size": str(max(sizes)),
                   "X-Default-Layout": str(any(out["default_layout"])).lower(),
                   "X-Replica": out["replica"], "X-Retries": str(retries)}  # fmt: skip
        if body.n == 1 and "image/png" in request.headers.get("accept", ""):
            return Response(pngs[0], media_type="image/png", headers=headers)
        payload = GenerateResponse(
            images=[base64.b64encode(p).decode() for p in pngs],
            seeds=seeds,
            model=ref.id,
            version=ref.version,
            size=out["size"],
            steps=out["steps"],
            guidance=out["guidance"],
            batch_size=max(sizes),
            batch_sizes=sizes,
            seconds=round(time.perf_counter() - started, 4),
            default_layout=any(out["default_layout"]),
            layout=await asyncio.to_thread(self._layout, ref) if any(out["default_layout"]) else None,
        )
        return JSONResponse(payload.model_dump(), headers=headers)


def build_app(args: dict | None = None):
    """The application for ``serve run`` / ``serve deploy`` (``args``: ``ServeSettings`` as a dict)."""
    settings = ServeSettings.from_dict(args)
    settings.tracking_uri = tracking_uri(settings.tracking_uri)
    capacity = settings.capacity
    backpressure = BackpressureConfig(status_code=503, retry_after_s=capacity.retry_after_s)
    ingress = serve.deployment(
        FaceforgeIngress,
        name="FaceforgeIngress",
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=capacity.ingress_max_ongoing,
        max_queued_requests=capacity.ingress_max_queued,
        backpressure_config=backpressure,
        user_config={"default_model": settings.default_model} if settings.default_model else None,
    )
    model = model_deployment(settings).options(backpressure_config=backpressure)
    values = settings.to_dict()
    return ingress.bind(model.bind(values), values)
