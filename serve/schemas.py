"""Request and response bodies of the HTTP API (they are also its OpenAPI schema at ``/docs``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = Field(
        None,
        description="registered model as name/VERSION, name@ALIAS or name (newest version); omitted: the default",
        examples=["faceforge-mmface-dit/1", "faceforge-face-mogle@champion"],
    )
    prompt: str = Field("", description="the caption; empty: unconditional on text")
    mask: str | None = Field(
        None, description="base64 PNG: a label map (grey values 0..18) or a CelebAMask-HQ colour-coded mask"
    )
    sketch: str | None = Field(None, description="base64 PNG line drawing, dark lines on white (MMFace-DiT)")
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="seed of the first image; image i uses seed + i")
    steps: int | None = Field(None, ge=1, description="sampler steps; omitted: the model's own setting")
    guidance: float | None = Field(None, ge=0, allow_inf_nan=False, description="guidance scale; omitted: the model's")
    n: int = Field(1, ge=1, description="number of images")


class GenerateResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    images: list[str] = Field(description="base64 PNGs, one per image")
    seeds: list[int]
    model: str = Field(description="the model version that answered, name/VERSION")
    version: int
    size: int
    steps: int
    guidance: float
    batch_size: int = Field(description="the largest sampler batch any of this request's images ran in")
    batch_sizes: list[int]
    seconds: float
    default_layout: bool = Field(
        False,
        description="true when the request had no mask and the model's default face layout (its most typical "
        "held-out mask, example 0 of GET /v1/models) stood in for it (Face-MoGLE needs a mask)",
    )
    layout: str | None = Field(None, description="that default layout as a base64 colour-coded PNG, when used")


class ExampleInfo(BaseModel):
    index: int = Field(description="K of `faceforge generate --example K`")
    id: str = Field(description="the held-out record it was drawn from")
    caption: str
    mask: str = Field(description="base64 colour-coded PNG at the model's resolution")
    sketch: str | None = Field(description="base64 PNG (dark lines on white), for models that take sketches")
    default_layout: bool = Field(description="this mask stands in when a request brings none (Face-MoGLE)")


class ModelVersionInfo(BaseModel):
    version: int
    id: str
    aliases: list[str]
    arch: str | None
    size: int | None
    accepts: dict[str, bool] | None
    default_steps: int | None
    default_guidance: float | None
    text_guidance: float | None = Field(
        None,
        description="what a request with text alone (no mask, no sketch) that names no guidance gets; "
        "null: default_guidance",
    )
    step: int | None
    examples: list[ExampleInfo] = Field(
        default_factory=list, description="held-out example conditions shipped with the version (publish)"
    )


class ModelInfo(BaseModel):
    name: str
    aliases: dict[str, int]
    versions: list[ModelVersionInfo]


class ModelsResponse(BaseModel):
    default: str | None = Field(description="what a request without 'model' gets, as name/VERSION")
    default_reference: str | None = Field(description="the configured default reference (may be an alias)")
    models: list[ModelInfo]
    limits: dict
