"""Face-MoGLE (SPEC §2): a FLUX transformer steered by 20 mask latents through MoGLE and a condition LoRA.

Entry points:

- ``PRESETS`` / ``describe_preset(name)``: "face-mogle-flux-dev" (the real FLUX.1-dev transformer, weights
  from a local diffusers folder via ``load_flux_transformer``) and "face-mogle-tiny" (the same architecture
  at toy size for the pixel codec's 48-channel latents and MiniLM text).
- ``build_model(preset_or_config, weights=None, device=None, dtype=None) -> FaceMoGLE``. Mode "lora": base
  frozen, LoRA (condition tokens only) + MoGLE train. Mode "full": the whole transformer + MoGLE train, no
  LoRA (the embedded demo's base stage).
- ``training_loss(model, batch, cfg=None, generator=None) -> Tensor``: FLUX rectified flow,
  ``t = sigmoid(N(0, 1))``, ``x_t = (1 - t) x0 + t eps``, target ``eps - x0``, MSE; guidance embedding 1.
  ``cfg`` is a ``FaceMoGLEConfig`` (None: the model's own) and supplies the dropout rates: caption -> empty
  caption with p = 0.1, each of the 19 local masks blacked out (an absent class) with p = 0.1, the global mask
  never. Batch keys: latent, text, pooled, null_text, null_pooled, null_cond_latent (C, h, w: a black image's
  latent, what a dropped local mask becomes), cond_latents (B, 20, C, h, w), text_mask / null_text_mask
  (padding tokens are hidden from attention, so training and serving see the same text).
- ``sample(model, conditions, seeds, steps=None, guidance=None, cfg_scale=None) -> latents (B, C, h, w)``:
  FlowMatch Euler with FLUX's dynamic shift; distilled guidance for guidance-embedding models, true CFG on
  the caption otherwise; MoGLE re-runs every step on that step's Z_t and t. ``background_conditions``
  renders the all-background mask for text-only generation.
- ``save_adapter(model, path)`` / ``load_adapter(model, path)``: LoRA + MoGLE weights in one safetensors
  file, configs as JSON in its header; LoRA keys use diffusers' ``transformer.<module>.lora_A.weight``
  naming, so ``FluxTransformer2DModel.load_lora_adapter(path)`` reads them into a plain FLUX.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from modeling.checkpoints import weights_dir
from modeling.diffusion import text_with_dropout
from modeling.flux_branch import Checkpointing, add_condition_lora, condition_forward, condition_lora_config
from modeling.mogle import NUM_EXPERTS, NUM_LOCAL, MoGLE, MoGLEConfig
from modeling.weights import load_weights

Mode = Literal["lora", "full"]


@dataclass(frozen=True)
class FluxConfig:
    """Architecture arguments of ``FluxTransformer2DModel`` (defaults: FLUX.1-dev)."""

    in_channels: int = 64
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = True
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)

    def __post_init__(self) -> None:
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(f"RoPE axes {self.axes_dims_rope} must sum to the head dim {self.attention_head_dim}")

    def kwargs(self) -> dict:
        return {**dataclasses.asdict(self), "axes_dims_rope": tuple(self.axes_dims_rope)}


@dataclass(frozen=True)
class FaceMoGLEConfig:
    latent_channels: int = 16  # codec channels; packed 2x2 into FLUX's in_channels
    flux: FluxConfig = field(default_factory=FluxConfig)
    mogle: MoGLEConfig = field(default_factory=MoGLEConfig)
    mode: Mode = "lora"
    lora_rank: int = 4
    lora_alpha: float = 4.0
    checkpointing: Checkpointing = "selective"
    text_dropout: float = 0.1
    local_mask_dropout: float = 0.1
    train_guidance: float = 1.0  # guidance-embedding value in training (guidance-distilled base)
    sample_steps: int = 28
    sample_guidance: float = 3.5  # distilled guidance at sampling, guidance-embedding models only
    cfg_scale: float = 1.0  # true CFG on the caption; 1 = off (FLUX.1-dev needs none)
    # FLUX's dynamic shift: mu grows linearly with the image token count between these anchors
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_seq_len: int = 256
    max_seq_len: int = 4096

    def __post_init__(self) -> None:
        packed = 4 * self.latent_channels
        if self.flux.in_channels != packed:
            raise ValueError(f"FLUX in_channels {self.flux.in_channels} != 4 x latent_channels ({packed})")
        if self.mogle.token_dim != packed:
            raise ValueError(f"MoGLE token_dim {self.mogle.token_dim} != packed latent dim {packed}")
        if self.mode not in ("lora", "full"):
            raise ValueError(f"Face-MoGLE mode must be 'lora' or 'full', got {self.mode!r}")
        if self.checkpointing not in ("none", "selective", "full"):
            raise ValueError(f"checkpointing must be none|selective|full, got {self.checkpointing!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FaceMoGLEConfig:
        data = dict(data)
        flux = dict(data.pop("flux", {}))
        if "axes_dims_rope" in flux:
            flux["axes_dims_rope"] = tuple(flux["axes_dims_rope"])
        return cls(flux=FluxConfig(**flux), mogle=MoGLEConfig(**data.pop("mogle", {})), **data)


PRESETS: dict[str, FaceMoGLEConfig] = {
    # the paper: frozen FLUX.1-dev (T5-XXL 4096 + CLIP-L pooled 768), FLUX VAE (16 ch), rank-4 LoRA
    "face-mogle-flux-dev": FaceMoGLEConfig(),
    # tests and the embedded demo: 32^2 faces through the 2x2 pixel codec (12 ch -> 48 packed), MiniLM text
    # (384 / 384), no guidance embedding (so true CFG at sampling); trained in "full" mode first, then "lora"
    "face-mogle-tiny": FaceMoGLEConfig(
        latent_channels=12,
        flux=FluxConfig(
            in_channels=48,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=32,
            num_attention_heads=4,
            joint_attention_dim=384,
            pooled_projection_dim=384,
            guidance_embeds=False,
            axes_dims_rope=(8, 12, 12),
        ),
        mogle=MoGLEConfig(token_dim=48, hidden=48),
        mode="full",
        checkpointing="none",
        sample_steps=20,
        cfg_scale=3.0,
    ),
}


def resolve_config(preset: str | FaceMoGLEConfig) -> FaceMoGLEConfig:
    if isinstance(preset, FaceMoGLEConfig):
        return preset
    if preset not in PRESETS:
        raise KeyError(f"unknown Face-MoGLE preset {preset!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[preset]


# ----------------------------------------------------------------------------------------------- packing


def pack_latents(latents: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): FLUX's 2x2 patch tokens, row-major."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(tokens: Tensor, h: int, w: int) -> Tensor:
    b, _, d = tokens.shape
    c = d // 4
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def pack_conditions(cond_latents: Tensor) -> Tensor:
    """(B, 20, C, h, w) -> (B, 20, N, 4C)."""
    b, e = cond_latents.shape[:2]
    return pack_latents(cond_latents.flatten(0, 1)).unflatten(0, (b, e))


def image_ids(h: int, w: int, device: torch.device | None = None) -> Tensor:
    """(h/2 * w/2, 3) FLUX position ids (0, row, col) of the packed latent grid."""
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    return (
        torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).flatten(0, 1).to(device=device, dtype=torch.float32)
    )


# ------------------------------------------------------------------------------------------------- model


class FaceMoGLE(nn.Module):
    """``transformer`` (a diffusers ``FluxTransformer2DModel``, LoRA-wrapped in "lora" mode) + ``mogle``."""

    def __init__(self, cfg: FaceMoGLEConfig, transformer: FluxTransformer2DModel | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.transformer = transformer if transformer is not None else FluxTransformer2DModel(**cfg.flux.kwargs())
        self.mogle = MoGLE(cfg.mogle)
        if cfg.mode == "lora":
            self.transformer.requires_grad_(False)
            add_condition_lora(self.transformer, cfg.lora_rank, cfg.lora_alpha)

    def forward(
        self,
        noisy: Tensor,
        t: Tensor,
        text: Tensor,
        pooled: Tensor,
        cond_tokens: Tensor | None,
        grid: tuple[int, int],
        guidance: Tensor | None = None,
        text_mask: Tensor | None = None,
    ) -> Tensor:
        """Velocity ``eps - x0`` for packed noisy tokens (B, N, D) at flow time t (B,) in [0, 1].

        ``cond_tokens`` (B, 20, N, D): packed condition latents, fused by MoGLE at this Z_t and t
        (None: the plain FLUX forward, no condition stream). ``grid`` = latent (h, w). ``text_mask`` (B, T) bool
        marks real text tokens; padding is hidden from attention (None: every token is real).
        """
        dtype = self.transformer.context_embedder.weight.dtype
        fused = None
        if cond_tokens is not None:
            # MoGLE runs in its own dtype (fp32 trainable weights beside a bf16 frozen base, say)
            own = next(self.mogle.parameters(), cond_tokens).dtype
            fused = self.mogle(cond_tokens.to(own), noisy.to(own), t).to(dtype)
        noisy = noisy.to(dtype)
        ids = image_ids(*grid, device=noisy.device)
        txt_ids = torch.zeros(text.shape[1], 3, device=noisy.device)
        return condition_forward(
            self.transformer,
            noisy,
            text.to(dtype),
            pooled.to(dtype),
            t,
            ids,
            txt_ids,
            guidance=guidance if self.cfg.flux.guidance_embeds else None,
            cond_tokens=fused,
            checkpointing=self.cfg.checkpointing,
            text_mask=text_mask,
        )


def load_flux_transformer(path: str | Path, dtype: torch.dtype = torch.bfloat16) -> FluxTransformer2DModel:
    """A FLUX transformer from a local diffusers folder: the pipeline root or its ``transformer/`` folder."""
    path = Path(path)
    if (path / "transformer" / "config.json").is_file():
        return FluxTransformer2DModel.from_pretrained(
            path, subfolder="transformer", torch_dtype=dtype, use_safetensors=True, local_files_only=True
        )
    if (path / "config.json").is_file():
        return FluxTransformer2DModel.from_pretrained(
            path, torch_dtype=dtype, use_safetensors=True, local_files_only=True
        )
    raise FileNotFoundError(f"{path}: no config.json here or in transformer/; expected a diffusers FLUX folder")


def build_model(
    preset: str | FaceMoGLEConfig,
    weights: str | Path | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> FaceMoGLE:
    """The model of a preset; ``weights`` = a local diffusers FLUX folder for the base (else random init)."""
    cfg = resolve_config(preset)
    transformer = None
    if weights is not None:
        transformer = load_flux_transformer(weights, dtype or torch.bfloat16)
        loaded = {k: transformer.config[k] for k in cfg.flux.kwargs()}
        loaded["axes_dims_rope"] = tuple(loaded["axes_dims_rope"])
        if loaded != cfg.flux.kwargs():
            raise ValueError(f"{weights}: transformer config {loaded} does not match the preset's {cfg.flux.kwargs()}")
    model = FaceMoGLE(cfg, transformer)
    return model.to(device=device, dtype=dtype)


def build_face_mogle(cfg: FaceMoGLEConfig, base_from: str | None, device: torch.device | str = "cpu") -> FaceMoGLE:
    """A Face-MoGLE model whose frozen base comes from ``base_from`` (lora mode) or is fresh (full mode)."""
    if cfg.mode == "full" or not base_from:
        with torch.device(device):
            return FaceMoGLE(cfg)
    base = Path(base_from)
    weights = weights_dir(base)
    if (weights / "config.json").is_file() and json.loads((weights / "config.json").read_text()).get("arch"):
        # a faceforge checkpoint of a full-mode run: its EMA holds the whole transformer and a trained MoGLE
        state, _ = load_weights(weights, ema=(weights / "ema.safetensors").is_file())
        transformer = FluxTransformer2DModel(**cfg.flux.kwargs())
        transformer.load_state_dict(_strip(state, "transformer."), strict=True)
        model = FaceMoGLE(cfg, transformer)
        model.mogle.load_state_dict(_strip(state, "mogle."), strict=True)
    else:
        model = FaceMoGLE(cfg, load_flux_transformer(base, torch.float32))
    return model.to(device)


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def load_trainable(model: nn.Module, state: dict) -> None:
    """Load a checkpoint's trainable weights (all weights in full mode; LoRA + MoGLE in lora mode)."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(trainable - set(state)), sorted(set(state) - trainable)
    if missing or unexpected:
        raise ValueError(f"weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def describe_preset(name: str) -> dict:
    """``{"preset", "params", "trainable", "components": {base, lora, mogle}}`` counted on the meta device."""
    with torch.device("meta"):
        model = FaceMoGLE(resolve_config(name))
    lora = sum(p.numel() for n, p in model.transformer.named_parameters() if ".lora_" in n)
    components = {
        "base": sum(p.numel() for p in model.transformer.parameters()) - lora,
        "lora": lora,
        "mogle": sum(p.numel() for p in model.mogle.parameters()),
    }
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"preset": name, "params": sum(components.values()), "trainable": trainable, "components": components}


# --------------------------------------------------------------------------------------------- objective


def _rand(shape: Sequence[int], generator: torch.Generator | None, device: torch.device, normal: bool) -> Tensor:
    # drawn on the generator's own device, so one seed gives the same draws whatever the model's device
    source = generator.device if generator is not None else device
    draw = torch.randn if normal else torch.rand
    return draw(tuple(shape), generator=generator, device=source).to(device)


def _null_pooled(batch: dict[str, Tensor], drop: Tensor) -> Tensor:
    pooled = batch["pooled"]
    return torch.where(drop[:, None], batch["null_pooled"].to(pooled.dtype)[None], pooled)


def training_loss(
    model: FaceMoGLE,
    batch: dict[str, Tensor],
    cfg: FaceMoGLEConfig | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Scalar flow-matching loss of one batch, condition dropout included; every draw comes from ``generator``."""
    cfg = cfg or model.cfg
    latent = batch["latent"]
    b, device = latent.shape[0], latent.device
    h, w = latent.shape[-2:]
    x0 = pack_latents(latent.float())
    noise = _rand(x0.shape, generator, device, normal=True)
    t = torch.sigmoid(_rand((b,), generator, device, normal=True))
    drop_text = _rand((b,), generator, device, normal=False) < cfg.text_dropout
    keep_local = _rand((b, NUM_LOCAL), generator, device, normal=False) >= cfg.local_mask_dropout

    noisy = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
    text, text_mask = text_with_dropout(
        batch["text"], batch.get("text_mask"), batch["null_text"], batch.get("null_text_mask"), drop_text
    )
    pooled = _null_pooled(batch, drop_text)
    cond = pack_conditions(batch["cond_latents"])
    # a dropped local mask becomes the latent of a black image, i.e. an absent class, as the official code
    # blacks out the mask image before the VAE (zero tokens never occur at inference); the global mask
    # (index 0) is always kept
    if "null_cond_latent" not in batch:
        raise KeyError("null_cond_latent: the batch needs the codec's latent of a black image (prepare writes it)")
    blank = pack_latents(batch["null_cond_latent"][None].to(cond.dtype))[:, None]  # (1, 1, N, D)
    keep = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=device), keep_local], dim=1)
    cond = torch.where(keep[:, :, None, None], cond, blank)
    guidance = torch.full((b,), cfg.train_guidance, device=device)
    pred = model(noisy, t, text, pooled, cond, (h, w), guidance, text_mask)
    return F.mse_loss(pred.float(), noise - x0)


# ----------------------------------------------------------------------------------------------- sampler


def flux_sigmas(steps: int, image_tokens: int, cfg: FaceMoGLEConfig) -> Tensor:
    """``steps + 1`` noise levels from 1 to 0, time-shifted by FLUX's resolution-dependent mu."""
    slope = (cfg.max_shift - cfg.base_shift) / (cfg.max_seq_len - cfg.base_seq_len)
    mu = cfg.base_shift + slope * (image_tokens - cfg.base_seq_len)
    sigmas = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    shifted = math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))
    return torch.cat([shifted, shifted.new_zeros(1)]).float()


def background_conditions(
    encode: Callable[[Tensor], Tensor], batch: int, size: int, device: torch.device | str = "cpu"
) -> Tensor:
    """cond_latents (B, 20, C, h, w) of an all-background mask, for text-only generation: the global mask
    is class 0's colour (black), the class-0 binary mask all white, the other 18 all black. ``encode`` is the
    codec's (images in [-1, 1] on ``device``)."""
    images = -torch.ones(NUM_EXPERTS, 3, size, size, device=device)
    images[1] = 1.0
    latents = encode(images)
    return latents[None].expand(batch, *latents.shape).contiguous()


@torch.no_grad()
def sample(
    model: FaceMoGLE,
    conditions: dict[str, Tensor],
    seeds: Sequence[int],
    steps: int | None = None,
    guidance: float | None = None,
    cfg_scale: float | None = None,
) -> Tensor:
    """Latents (B, C, h, w) shaped like the condition latents; sample ``i`` starts from noise of ``seeds[i]``.

    ``conditions``: text, pooled, cond_latents, and for true CFG null_text, null_pooled (text_mask optional).
    """
    cfg = model.cfg
    steps = steps or cfg.sample_steps
    guidance = cfg.sample_guidance if guidance is None else guidance
    scale = cfg.cfg_scale if cfg_scale is None else cfg_scale
    cond_latents = conditions["cond_latents"]
    b, _, c, h, w = cond_latents.shape
    if len(seeds) != b:
        raise ValueError(f"sample got {len(seeds)} seeds for a batch of {b} condition sets")
    device = cond_latents.device
    cond = pack_conditions(cond_latents.float())
    text, pooled, text_mask = conditions["text"], conditions["pooled"], conditions.get("text_mask")
    guided = scale != 1.0 and not cfg.flux.guidance_embeds
    if guided:
        # caption-only CFG: the unconditional half keeps the masks, swaps in the empty caption
        drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(device)
        text, text_mask = text_with_dropout(
            text.repeat(2, 1, 1),
            None if conditions.get("text_mask") is None else conditions["text_mask"].repeat(2, 1),
            conditions["null_text"],
            conditions.get("null_text_mask"),
            drop,
        )
        pooled = torch.where(drop[:, None], conditions["null_pooled"].to(pooled.dtype)[None], pooled.repeat(2, 1))
        cond = cond.repeat(2, 1, 1, 1)

    noise = [torch.randn(c, h, w, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    x = pack_latents(torch.stack(noise).to(device))
    sigmas = flux_sigmas(steps, x.shape[1], cfg).to(device)
    reps = 2 if guided else 1
    guidance_vec = torch.full((b * reps,), guidance, device=device)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x_in = x.repeat(reps, 1, 1)
        v = model(x_in, sigma.expand(b * reps), text, pooled, cond, (h, w), guidance_vec, text_mask).float()
        if guided:
            v_cond, v_uncond = v.chunk(2)
            v = v_uncond + scale * (v_cond - v_uncond)
        x = x + (sigma_next - sigma) * v
    return unpack_latents(x, h, w)


# -------------------------------------------------------------------------------------------- LoRA I/O

_LORA_PREFIX = "transformer."
_MOGLE_PREFIX = "mogle."


def save_adapter(model: FaceMoGLE, path: str | Path) -> None:
    """Write the LoRA and MoGLE weights (never the base) and both configs to one safetensors file."""
    if model.cfg.mode != "lora":
        raise ValueError("save_adapter needs a 'lora'-mode model; a 'full' model's base is its checkpoint")
    lora = get_peft_model_state_dict(model.transformer, adapter_name="default")
    tensors = {_LORA_PREFIX + k: v for k, v in lora.items()}
    tensors.update({_MOGLE_PREFIX + k: v for k, v in model.mogle.state_dict().items()})
    lora_config = condition_lora_config(model.cfg.lora_rank, model.cfg.lora_alpha).to_dict()
    metadata = {
        # what diffusers' load_lora_adapter reads to rebuild the LoraConfig (keys prefixed by component)
        "lora_adapter_metadata": json.dumps({_LORA_PREFIX + k: v for k, v in lora_config.items()}, default=list),
        "face_mogle_config": json.dumps(model.cfg.to_dict()),
        "format": "pt",
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)


def read_adapter_config(path: str | Path) -> FaceMoGLEConfig:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if "face_mogle_config" not in metadata:
        raise ValueError(f"{path}: no face_mogle_config in the safetensors header; not a Face-MoGLE adapter")
    return FaceMoGLEConfig.from_dict(json.loads(metadata["face_mogle_config"]))


def load_adapter(model: FaceMoGLE, path: str | Path) -> None:
    """Load a ``save_adapter`` file into a "lora"-mode model with the same LoRA rank and MoGLE config."""
    saved = read_adapter_config(path)
    ours = model.cfg
    if (saved.lora_rank, saved.lora_alpha, saved.mogle, saved.flux) != (
        ours.lora_rank,
        ours.lora_alpha,
        ours.mogle,
        ours.flux,
    ):
        raise ValueError(f"{path}: adapter was saved for {saved}, which does not fit this model ({ours})")
    lora, mogle = {}, {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            if key.startswith(_LORA_PREFIX):
                lora[key[len(_LORA_PREFIX) :]] = f.get_tensor(key)
            elif key.startswith(_MOGLE_PREFIX):
                mogle[key[len(_MOGLE_PREFIX) :]] = f.get_tensor(key)
    result = set_peft_model_state_dict(model.transformer, lora, adapter_name="default")
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path}: LoRA keys do not match the model (missing {missing[:3]}, "
            f"unexpected {list(result.unexpected_keys)[:3]})"
        )
    model.mogle.load_state_dict(mogle)
