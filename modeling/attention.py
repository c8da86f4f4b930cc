"""Scaled dot-product attention for both models, with one CPU special case.

On a GPU (and in fp32) this is ``F.scaled_dot_product_attention``. On a CPU in bf16 (autocast training or
sampling on CPUs with bf16 matrix units), PyTorch's CPU flash kernel is slower than fp32, its backward
twice so; the plain matmul form runs both products on the bf16 GEMM units and keeps the softmax in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """(B, H, Lq, D), (B, H, Lk, D) x2 -> (B, H, Lq, D); ``mask`` bool, broadcastable to (B, H, Lq, Lk), True =
    attend."""
    if q.device.type == "cpu" and torch.bfloat16 in (q.dtype, k.dtype, v.dtype):
        dtype = torch.bfloat16
        scores = (q.to(dtype) @ k.to(dtype).transpose(-1, -2)).float() * q.shape[-1] ** -0.5
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(dim=-1).to(dtype) @ v.to(dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
