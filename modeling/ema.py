"""Exponential moving average of trainable weights, for any model in faceforge.

The average lives in an fp32 *shadow* (one tensor per tracked parameter) and is updated with fused
``torch._foreach_*`` kernels: one launch per step for the whole model rather than one per tensor.

The API works on explicit, ordered lists of tensors so that it does not care how parameters are
stored. That is what makes it usable under DeepSpeed ZeRO-3, where a rank holds only a shard of each
parameter. The trainer does, on every rank::

    params = [p for _, p in named_trainable]          # same order as at construction
    with deepspeed.zero.GatheredParameters(params):   # full tensors visible inside this block
        ema.update(params)

and the same for construction (``EMA(names, params)``) and for ``copy_to``. Without DeepSpeed,
``EMA.from_module(model)`` and ``ema.update(ema.tracked(model))`` do the same in one line each.

Decay warm-up: early in training the weights move fast and a 0.9999 average would be dominated by
the random init for ~10k steps, so the effective decay is ``min(decay, (1 + n) / (10 + n))`` after
``n`` updates (off with ``warmup=False``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn


class EMA:
    """fp32 shadow copy of an ordered list of named tensors, averaged with ``update``."""

    def __init__(
        self,
        names: Sequence[str],
        tensors: Sequence[Tensor],
        decay: float = 0.9999,
        warmup: bool = True,
    ) -> None:
        if len(names) != len(tensors):
            raise ValueError(f"EMA got {len(names)} names but {len(tensors)} tensors")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.names = list(names)
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.shadow = [t.detach().to(dtype=torch.float32, copy=True) for t in tensors]

    @classmethod
    def from_module(cls, module: nn.Module, decay: float = 0.9999, warmup: bool = True) -> EMA:
        """Track every parameter of ``module`` with ``requires_grad`` (frozen weights never move)."""
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        return cls([n for n, _ in named], [p for _, p in named], decay=decay, warmup=warmup)

    def tracked(self, module: nn.Module) -> list[Tensor]:
        """The parameters of ``module`` that this EMA tracks, in the order ``update`` expects."""
        params = dict(module.named_parameters())
        missing = [n for n in self.names if n not in params]
        if missing:
            raise KeyError(f"module lacks EMA-tracked parameters: {missing[:5]}")
        return [params[n] for n in self.names]

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, tensors: Sequence[Tensor]) -> None:
        """``shadow = d * shadow + (1 - d) * tensor`` for all tracked tensors at once."""
        if len(tensors) != len(self.shadow):
            raise ValueError(f"EMA.update got {len(tensors)} tensors, tracks {len(self.shadow)}")
        d = self.current_decay()
        # bf16/fp16 weights are upcast first so that tiny (1 - d) increments are not rounded away
        values = [t.detach() if t.dtype == torch.float32 else t.detach().float() for t in tensors]
        torch._foreach_mul_(self.shadow, d)
        torch._foreach_add_(self.shadow, values, alpha=1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, target: nn.Module | Sequence[Tensor]) -> None:
        """Write the averaged weights into a module (by name) or into an ordered list of tensors."""
        tensors = self.tracked(target) if isinstance(target, nn.Module) else list(target)
        if len(tensors) != len(self.shadow):
            raise ValueError(f"EMA.copy_to got {len(tensors)} tensors, tracks {len(self.shadow)}")
        for dst, src in zip(tensors, self.shadow):
            dst.copy_(src)

    def to(self, device: torch.device | str) -> EMA:
        """Move the shadow (e.g. to CPU to free accelerator memory between updates)."""
        self.shadow = [s.to(device) for s in self.shadow]
        return self

    def shadow_state_dict(self) -> dict[str, Tensor]:
        """The averaged weights by parameter name: what gets saved as the model's EMA weights."""
        return dict(zip(self.names, self.shadow))

    def state_dict(self) -> dict[str, object]:
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "shadow": self.shadow_state_dict(),
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        shadow = state["shadow"]
        assert isinstance(shadow, dict)
        if set(shadow) != set(self.names):
            extra, missing = set(shadow) - set(self.names), set(self.names) - set(shadow)
            raise KeyError(f"EMA state mismatch: unexpected {sorted(extra)[:5]}, missing {sorted(missing)[:5]}")
        self.decay = float(state["decay"])  # type: ignore[arg-type]
        self.warmup = bool(state["warmup"])
        self.num_updates = int(state["num_updates"])  # type: ignore[call-overload]
        for i, name in enumerate(self.names):
            self.shadow[i].copy_(shadow[name])


def tracked_names(module: nn.Module) -> Iterable[str]:
    """Names ``EMA.from_module`` would track, for trainers that build the EMA from gathered tensors."""
    return (n for n, p in module.named_parameters() if p.requires_grad)
