"""Benchmark cases: one module per architecture, each exposing ``MODELS``, ``DEFAULT_BATCH`` (per
device type) and ``build(args, device)``.

``bench/train_step.py`` finds the module whose ``MODELS`` names the requested model and times the
``Case`` it returns. Models are best built lazily inside ``step`` / ``peer_step`` (on the first,
untimed warm-up call), so that ours and the peer never share accelerator memory: the harness drops
a case's ``step`` and ``sample`` before it runs ``peer_step``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

CASE_MODULES = ("bench.cases.mmface", "bench.cases.mogle")


@dataclass
class Case:
    name: str
    batch: int
    depth: int
    step: Callable[[], None] | None  # one optimizer step of our model (fwd + bwd + AdamW8bit)
    peer_name: str | None = None
    peer_step: Callable[[], None] | None = None  # the same for the peer, same size and batch
    sample: Callable[[], int] | None = None  # one inference run; returns the number of images
    extra: dict = field(default_factory=dict)  # case-specific fields for the JSON line


OPTIMIZERS = {
    # the trainer's AdamW8bit: bitsandbytes' kernel on CUDA, a chunked update on CPU (modeling/optim.py)
    "faceforge": "modeling.optim.AdamW8bit",
    # what a user of the peer would pick
    "bitsandbytes": "bitsandbytes.optim.AdamW8bit",
}


def adamw8bit(params: Iterable[torch.nn.Parameter], impl: str = "faceforge") -> torch.optim.Optimizer:
    """AdamW 8-bit with the paper's hyper-parameters; ``impl`` names a key of ``OPTIMIZERS``."""
    if impl == "faceforge":
        from modeling.optim import AdamW8bit
    elif impl == "bitsandbytes":
        from bitsandbytes.optim import AdamW8bit
    else:
        raise ValueError(f"unknown optimizer {impl!r}; known: {', '.join(OPTIMIZERS)}")
    return AdamW8bit(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (fp32 master weights); plain fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
