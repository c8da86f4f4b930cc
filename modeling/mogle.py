"""MoGLE: the mixture of one global and nineteen local experts that turns 20 mask latents into condition tokens.

Input: the packed latents of the 20 condition images of SPEC §2, ``(B, 20, L, D)`` (index 0 = colour-coded
global mask, 1..19 = binary mask of class 0..18), the packed noisy latent ``Z_t`` ``(B, L, D)`` and the flow
time ``t`` in [0, 1]. Each expert is a per-token MLP ``D -> hidden -> D`` applied to its own image; a
diffusion-aware gate mixes the 20 expert outputs per token::

    h = global_tokens + Linear(Z_t) + TimeMLP(sinusoid(t))         (B, L, D)
    w = softmax(Linear(ReLU(Linear(h))))                            (B, L, 20)
    C = sum_e w_e * expert_e(x_e)                                   (B, L, D)

The experts are stored as stacked weights and run as two einsums over the expert axis, so all 20 MLPs are
two batched matmuls rather than 20 small launches.

Ablations of the paper (``MoGLEConfig``): ``experts`` = "global+local" | "global" | "local";
``expert_mlp=False`` replaces every expert by the identity; ``gating`` = "dynamic" (the paper) | "static"
(the gate sees only the global tokens, no Z_t / t) | "scalar" (dynamic weights averaged over tokens) |
"sum" (no gate, plain sum of the expert outputs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NUM_LOCAL = 19  # CelebAMask-HQ classes, background included
NUM_EXPERTS = 1 + NUM_LOCAL

ExpertSet = Literal["global+local", "global", "local"]
Gating = Literal["dynamic", "static", "scalar", "sum"]


@dataclass(frozen=True)
class MoGLEConfig:
    token_dim: int = 64  # packed latent dim: 16 VAE channels x 2 x 2
    hidden: int = 32
    time_freq_dim: int = 64  # sinusoid width fed to the time MLP
    # the sinusoid embeds time_scale * t: 1000 for models trained here (the usual integer-step frequencies);
    # 1 for the released Face-MoGLE checkpoint, whose gate was trained on t in [0, 1] unscaled
    time_scale: float = 1000.0
    experts: ExpertSet = "global+local"
    expert_mlp: bool = True
    gating: Gating = "dynamic"

    def __post_init__(self) -> None:
        if self.experts not in ("global+local", "global", "local"):
            raise ValueError(f"MoGLEConfig.experts must be global+local|global|local, got {self.experts!r}")
        if self.gating not in ("dynamic", "static", "scalar", "sum"):
            raise ValueError(f"MoGLEConfig.gating must be dynamic|static|scalar|sum, got {self.gating!r}")
        if self.experts == "local" and self.gating == "static":
            raise ValueError(
                "MoGLEConfig: a static gate sees only the global mask, which the 'local' ablation removes; "
                "use gating=dynamic|scalar|sum with experts=local"
            )
        if self.time_freq_dim % 2:
            raise ValueError(f"MoGLEConfig.time_freq_dim must be even, got {self.time_freq_dim}")


def timestep_sinusoid(t: Tensor, dim: int, scale: float = 1000.0, max_period: float = 10_000.0) -> Tensor:
    """(B,) times in [0, 1] -> (B, dim) [cos | sin] features of ``scale * t``.

    The default scale 1000 makes [0, 1] span the same frequencies as the usual integer-step embeddings; the
    gate must always receive t in [0, 1] (SPEC §2 decision), never 0..1000.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * scale)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ExpertBank(nn.Module):
    """``n`` independent per-token MLPs ``D -> hidden -> D`` held as stacked weights."""

    def __init__(self, n: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n, dim, hidden))
        self.b1 = nn.Parameter(torch.empty(n, hidden))
        self.w2 = nn.Parameter(torch.empty(n, hidden, dim))
        self.b2 = nn.Parameter(torch.empty(n, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # the nn.Linear default (uniform in +-1/sqrt(fan_in)) per expert, so each expert starts like the
        # reference's independent Linear layers
        for w, b in ((self.w1, self.b1), (self.w2, self.b2)):
            bound = 1.0 / math.sqrt(w.shape[1])
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        """(B, n, L, D) -> (B, n, L, D); expert ``e`` sees only ``x[:, e]``."""
        h = torch.einsum("beld,edh->belh", x, self.w1) + self.b1[None, :, None]
        return torch.einsum("belh,ehd->beld", F.relu(h), self.w2) + self.b2[None, :, None]


class ExpertGate(nn.Module):
    """Per-token softmax weights over the experts, conditioned on the global tokens, Z_t and t."""

    def __init__(self, cfg: MoGLEConfig) -> None:
        super().__init__()
        d = cfg.token_dim
        self.cfg = cfg
        if cfg.gating != "static":
            self.latent_proj = nn.Linear(d, d)
            self.time_mlp = nn.Sequential(nn.Linear(cfg.time_freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.mlp = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, NUM_EXPERTS))

    def forward(self, global_tokens: Tensor | None, noisy_tokens: Tensor | None, t: Tensor | None) -> Tensor:
        """-> (B, L, 20) logits. ``global_tokens`` is None in the "local" ablation: no global mask anywhere."""
        h = global_tokens
        if self.cfg.gating != "static":
            if noisy_tokens is None or t is None:
                raise ValueError("a diffusion-aware MoGLE gate needs the noisy latent Z_t and the time t")
            temb = self.time_mlp(
                timestep_sinusoid(t, self.cfg.time_freq_dim, self.cfg.time_scale).to(noisy_tokens.dtype)
            )
            h = self.latent_proj(noisy_tokens) + temb[:, None] + (0 if h is None else h)
        return self.mlp(h)


class MoGLE(nn.Module):
    """Fuses the 20 packed condition latents into one condition token sequence ``(B, L, D)``."""

    def __init__(self, cfg: MoGLEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.experts = ExpertBank(NUM_EXPERTS, cfg.token_dim, cfg.hidden) if cfg.expert_mlp else None
        self.gate = ExpertGate(cfg) if cfg.gating != "sum" and cfg.experts != "global" else None
        # which experts take part; the others are masked out of the gate and of the sum
        active = torch.ones(NUM_EXPERTS, dtype=torch.bool)
        if cfg.experts == "global":
            active[1:] = False
        elif cfg.experts == "local":
            active[0] = False
        self.register_buffer("active", active, persistent=False)

    def gate_weights(self, cond_tokens: Tensor, noisy_tokens: Tensor | None, t: Tensor | None) -> Tensor:
        """(B, L, 20) mixing weights: in [0, 1], summing to 1 over the active experts (0 for inactive)."""
        b, _, length, _ = cond_tokens.shape
        if self.gate is None:  # "sum" gating, or a single (global) expert: every active expert has weight 1
            return self.active.to(cond_tokens.dtype).expand(b, length, NUM_EXPERTS)
        # the "local" ablation removes the global mask everywhere, the gate's input included (the paper's table)
        global_tokens = None if self.cfg.experts == "local" else cond_tokens[:, 0]
        logits = self.gate(global_tokens, noisy_tokens, t).float()
        logits = logits.masked_fill(~self.active, float("-inf"))
        weights = logits.softmax(dim=-1)
        if self.cfg.gating == "scalar":
            weights = weights.mean(dim=1, keepdim=True).expand_as(weights)
        return weights.to(cond_tokens.dtype)

    def forward(self, cond_tokens: Tensor, noisy_tokens: Tensor | None = None, t: Tensor | None = None) -> Tensor:
        """cond_tokens (B, 20, L, D), noisy_tokens (B, L, D), t (B,) in [0, 1] -> (B, L, D)."""
        if cond_tokens.shape[1] != NUM_EXPERTS:
            raise ValueError(f"MoGLE expects {NUM_EXPERTS} condition images, got shape {tuple(cond_tokens.shape)}")
        weights = self.gate_weights(cond_tokens, noisy_tokens, t)
        outputs = self.experts(cond_tokens) if self.experts is not None else cond_tokens
        return torch.einsum("ble,beld->bld", weights, outputs)
