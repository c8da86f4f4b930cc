"""MMFace-DiT: a dual-stream diffusion transformer conditioned on a caption and a mask or sketch.

SPEC.md §1. The noisy latent and the spatial condition latent (mask or sketch, same codec) are
stacked on channels and patchified into image tokens; caption tokens form a second stream. Every
block modulates both streams from one global vector ``c = time + caption + modality`` and runs one
joint attention over ``[image; text]``. There is no absolute position embedding (RoPE only), so a
model trained at 256^2 runs unchanged at 512^2.

Layout: ``MMFaceDiTConfig`` + ``PRESETS`` (data), small modules named after what they are, one
``initialize_weights`` that says what starts at zero, ``describe_preset`` for ``faceforge model info``.
The objectives and samplers live in ``modeling/diffusion.py``.

Model time: ``forward`` takes ``timestep`` in [0, 1000] for both objectives (DDPM step index, or
1000 * flow time), so the sinusoid sees the same range either way.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from modeling.attention import attention
from modeling.rope import apply_rope, axial_positions, rope_angles, rope_cos_sin, sequence_positions


@dataclass(frozen=True)
class MMFaceDiTConfig:
    latent_channels: int = 16  # channels of the image latent; the condition latent has the same
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    patch_size: int = 2
    mlp_ratio: float = 4.0
    text_dim: int = 1024  # token states of the text encoder
    pooled_dim: int = 1024  # pooled caption vector
    text_rope: bool = True  # 1-D RoPE on text tokens (paper); False = all-zero positions (public code)
    rope_theta: float = 10_000.0
    frequency_embedding_size: int = 256
    # the sinusoid embeds timestep_scale * timestep: 1 here; 0.999 for the released flow checkpoints, whose code
    # embeds 999 * t where ours feeds 1000 * t (see modeling/importers.py)
    timestep_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 4:
            raise ValueError(f"head dim {self.head_dim} must split into two even RoPE axes (multiple of 4)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MMFaceDiTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown MMFaceDiTConfig fields {sorted(unknown)}")
        return cls(**data)


PRESETS: dict[str, MMFaceDiTConfig] = {
    # the paper's model: FLUX VAE latents (16 ch), OpenCLIP ViT-H text (77 x 1024 + pooled 1024)
    "mmface-dit-xl": MMFaceDiTConfig(),
    # tests and the embedded demo: 32^2 faces through the 2x2 pixel codec (12 x 16 x 16), MiniLM text (384 / 384)
    "mmface-dit-tiny": MMFaceDiTConfig(
        latent_channels=12, hidden_size=128, depth=4, num_heads=4, text_dim=384, pooled_dim=384
    ),
}


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return torch.addcmul(shift, x, 1 + scale)


def gated_residual(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    return torch.addcmul(x, gate, y)


def layer_norm(x: Tensor) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def timestep_sinusoid(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """(B,) timesteps -> (B, dim) [cos | sin] features, as in DiT."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, frequency_size: int, scale: float = 1.0) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.scale = scale
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: Tensor) -> Tensor:
        features = timestep_sinusoid(t.float() * self.scale, self.frequency_size).to(self.mlp[0].weight.dtype)
        return self.mlp(features)


class CaptionEmbedder(nn.Module):
    """Pooled caption vector -> hidden; a learned vector stands in for a dropped caption."""

    def __init__(self, pooled_dim: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(pooled_dim, hidden)
        self.null = nn.Parameter(torch.zeros(hidden))

    def forward(self, pooled: Tensor, drop: Tensor | None) -> Tensor:
        emb = self.proj(pooled)
        if drop is None:
            return emb
        # torch.where, not boolean indexing: no host sync, same graph whatever the dropout draw
        return torch.where(drop[:, None], self.null.to(emb.dtype), emb)


@dataclass
class StreamModulation:
    """Shift/scale/gate for the attention and the MLP of one stream, each (B, 1, hidden)."""

    attn_shift: Tensor
    attn_scale: Tensor
    attn_gate: Tensor
    mlp_shift: Tensor
    mlp_scale: Tensor
    mlp_gate: Tensor


class DualStreamBlock(nn.Module):
    """Image and text streams with their own weights, one joint attention, one shared AdaLN linear."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        mlp_hidden = int(hidden * mlp_ratio)
        # 12 vectors: (shift, scale, gate) x (attention, MLP) x (image, text)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 12 * hidden))
        # q, k and v of a stream are one Linear(h, 3h): the same parameters as three projections,
        # one GEMM instead of three
        self.img_qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.txt_qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.img_out = nn.Linear(hidden, hidden, bias=False)
        self.txt_out = nn.Linear(hidden, hidden, bias=False)
        self.img_mlp = _mlp(hidden, mlp_hidden)
        self.txt_mlp = _mlp(hidden, mlp_hidden)

    def modulation(self, c: Tensor) -> tuple[StreamModulation, StreamModulation]:
        chunks = self.adaLN_modulation(c)[:, None, :].chunk(12, dim=-1)
        return StreamModulation(*chunks[:6]), StreamModulation(*chunks[6:])

    def qkv(self, x: Tensor, proj: nn.Linear) -> Tensor:
        """(B, N, h) -> (3, B, heads, N, head_dim)."""
        b, n, h = x.shape
        return proj(x).view(b, n, 3, self.num_heads, h // self.num_heads).permute(2, 0, 3, 1, 4)

    def kv(self, x: Tensor, proj: nn.Linear) -> Tensor:
        """Keys and values only: (B, N, h) -> (2, B, heads, N, head_dim), from the k/v rows of ``proj``."""
        b, n, h = x.shape
        return F.linear(x, proj.weight[h:]).view(b, n, 2, self.num_heads, h // self.num_heads).permute(2, 0, 3, 1, 4)

    def forward(
        self,
        img: Tensor,
        txt: Tensor,
        c: Tensor,
        cos: Tensor,
        sin: Tensor,
        attn_mask: Tensor | None,
        last: bool = False,
    ) -> tuple[Tensor, Tensor]:
        mod_img, mod_txt = self.modulation(c)
        n_img = img.shape[1]
        q_i, k_i, v_i = self.qkv(modulate(layer_norm(img), mod_img.attn_shift, mod_img.attn_scale), self.img_qkv)
        txt_in = modulate(layer_norm(txt), mod_txt.attn_shift, mod_txt.attn_scale)
        if last:
            # only image tokens reach the final layer: text queries, the text attention output and
            # the text MLP of the last block would be dead work. Text still gives keys and values.
            k_t, v_t = self.kv(txt_in, self.txt_qkv)
            q = apply_rope(q_i, cos[:n_img], sin[:n_img])
        else:
            q_t, k_t, v_t = self.qkv(txt_in, self.txt_qkv)
            q = apply_rope(torch.cat([q_i, q_t], dim=2), cos, sin)
        k = apply_rope(torch.cat([k_i, k_t], dim=2), cos, sin)
        v = torch.cat([v_i, v_t], dim=2)
        attn = attention(q, k, v, attn_mask)
        attn = attn.transpose(1, 2).flatten(2)
        img = gated_residual(img, mod_img.attn_gate, self.img_out(attn[:, :n_img]))
        img = gated_residual(
            img, mod_img.mlp_gate, self.img_mlp(modulate(layer_norm(img), mod_img.mlp_shift, mod_img.mlp_scale))
        )
        if last:
            return img, txt
        txt = gated_residual(txt, mod_txt.attn_gate, self.txt_out(attn[:, n_img:]))
        txt = gated_residual(
            txt, mod_txt.mlp_gate, self.txt_mlp(modulate(layer_norm(txt), mod_txt.mlp_shift, mod_txt.mlp_scale))
        )
        return img, txt


def _mlp(hidden: int, mlp_hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, hidden))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.linear = nn.Linear(hidden, patch_size * patch_size * out_channels)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None, :].chunk(2, dim=-1)
        return self.linear(modulate(layer_norm(x), shift, scale))


class MMFaceDiT(nn.Module):
    def __init__(self, config: MMFaceDiTConfig) -> None:
        super().__init__()
        self.config = config
        h, p, c = config.hidden_size, config.patch_size, config.latent_channels
        self.x_embedder = nn.Conv2d(2 * c, h, kernel_size=p, stride=p)
        self.t_embedder = TimestepEmbedder(h, config.frequency_embedding_size, config.timestep_scale)
        self.caption_embedder = CaptionEmbedder(config.pooled_dim, h)
        self.text_embedder = nn.Linear(config.text_dim, h)
        self.modality_embedder = nn.Embedding(2, h)
        self.blocks = nn.ModuleList(DualStreamBlock(h, config.num_heads, config.mlp_ratio) for _ in range(config.depth))
        self.final_layer = FinalLayer(h, p, c)
        self.checkpoint_every = 0
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT init; everything that writes into the residual stream or the output starts at zero.

        Zero AdaLN makes every gate zero, so each block starts as the identity; a zero final layer
        makes the initial prediction exactly zero. Training then grows the network from there.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        nn.init.normal_(self.modality_embedder.weight, std=0.02)
        nn.init.normal_(self.caption_embedder.null, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def set_gradient_checkpointing(self, every: int) -> None:
        """Recompute activations of every ``every``-th block in the backward (0 = off, 1 = all)."""
        if every < 0:
            raise ValueError(f"checkpoint interval must be >= 0, got {every}")
        self.checkpoint_every = every

    def rope_tables(
        self, grid_h: int, grid_w: int, n_text: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        """cos/sin (N_image + N_text, head_dim) for the joint sequence, image tokens first."""
        cfg = self.config
        half = cfg.head_dim // 2
        img = rope_angles(axial_positions(grid_h, grid_w, device), (half, half), cfg.rope_theta)
        if cfg.text_rope:
            txt = rope_angles(sequence_positions(n_text, device), (cfg.head_dim,), cfg.rope_theta)
        else:
            txt = img.new_zeros(n_text, cfg.head_dim // 2)
        return rope_cos_sin(torch.cat([img, txt], dim=0), dtype)

    def forward(
        self,
        x: Tensor,
        cond: Tensor,
        timestep: Tensor,
        text: Tensor,
        pooled: Tensor,
        modality: Tensor,
        text_mask: Tensor | None = None,
        drop_caption: Tensor | None = None,
    ) -> Tensor:
        """Predict eps (DDPM) or velocity (flow) for the noisy latent ``x``.

        x, cond: (B, C, H, W) noisy latent and spatial-condition latent; timestep: (B,) in [0, 1000];
        text: (B, L, text_dim) with text_mask (B, L) bool, True = real token (None = all real);
        pooled: (B, pooled_dim); modality: (B,) long, 0 mask / 1 sketch; drop_caption: (B,) bool,
        True = use the learned null caption vector instead of ``pooled``.
        """
        b, _, height, width = x.shape
        p = self.config.patch_size
        grid_h, grid_w = height // p, width // p
        img = self.x_embedder(torch.cat([x, cond], dim=1)).flatten(2).transpose(1, 2)
        txt = self.text_embedder(text)
        c = self.t_embedder(timestep) + self.caption_embedder(pooled, drop_caption) + self.modality_embedder(modality)
        cos, sin = self.rope_tables(grid_h, grid_w, txt.shape[1], x.device, img.dtype)
        attn_mask = None
        if text_mask is not None:
            image_keys = text_mask.new_ones(b, img.shape[1])
            attn_mask = torch.cat([image_keys, text_mask], dim=1)[:, None, None, :]

        for i, block in enumerate(self.blocks):
            last = i == len(self.blocks) - 1
            if self.training and self.checkpoint_every and i % self.checkpoint_every == 0:
                img, txt = checkpoint(block, img, txt, c, cos, sin, attn_mask, last, use_reentrant=False)
            else:
                img, txt = block(img, txt, c, cos, sin, attn_mask, last)

        out = self.final_layer(img, c)
        return self.unpatchify(out, grid_h, grid_w)

    def unpatchify(self, tokens: Tensor, grid_h: int, grid_w: int) -> Tensor:
        """(B, h*w, p*p*C) -> (B, C, h*p, w*p)."""
        p, c = self.config.patch_size, self.config.latent_channels
        b = tokens.shape[0]
        x = tokens.view(b, grid_h, grid_w, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, grid_h * p, grid_w * p)


def build(preset: str | MMFaceDiTConfig, device: torch.device | str | None = None) -> MMFaceDiT:
    config = PRESETS[preset] if isinstance(preset, str) else preset
    with torch.device(device or "cpu"):
        return MMFaceDiT(config)


def describe_preset(name: str) -> dict:
    """``{"preset", "params", "trainable", "components"}`` counted on the meta device (no memory)."""
    if name not in PRESETS:
        raise KeyError(f"unknown MMFace-DiT preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    model = build(name, device="meta")
    components = {
        "embedders": sum(
            _count(m)
            for m in (
                model.x_embedder,
                model.t_embedder,
                model.caption_embedder,
                model.text_embedder,
                model.modality_embedder,
            )
        ),
        "blocks": _count(model.blocks),
        "final_layer": _count(model.final_layer),
    }
    params = _count(model)
    assert params == sum(components.values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"preset": name, "params": params, "trainable": trainable, "components": components}


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
