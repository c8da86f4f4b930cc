"""bitsandbytes AdamW8bit with a faster CPU update, state-compatible with the original.

On CUDA this *is* ``bitsandbytes.optim.AdamW8bit`` (its fused kernel runs). On CPU bitsandbytes
runs the 8-bit blockwise update as a dozen eager passes over each whole tensor plus a binary-search
quantizer; on a 13824 x 1152 AdaLN weight (64 MB) every pass misses the cache, and the quantizer
alone costs ~3.6 ns per element on two cores. Here the same update runs

- in chunks of ``chunk_elements`` per intra-op thread (a multiple of the 256-element quantization
  block), so all passes over a thread's share of a chunk stay in its cache; a chunk grows with
  ``torch.get_num_threads()``, so T threads meet at 1/T as many per-op barriers (on a loaded 2-core
  machine, 256K-element chunks over two threads cost 18x the CPU time of one thread), and
- with a table-driven quantizer: the top 16 bits of a float32 pick the run of codes it can round
  to (precomputed once per code map), one comparison with the neighbouring midpoint finishes the
  round-to-nearest. It is exact nearest-code rounding (bitsandbytes' CPU quantizer is not: it
  sends values below ~1e-5 of a block's absmax to +-2.1e-5 instead of 0).

The optimizer state keeps bitsandbytes' layout and meaning (``state1``/``state2`` uint8 codes of the
``dynamic`` / ``udynamic`` maps, ``absmax1``/``absmax2`` per 256-element block, ``qmap1``/``qmap2``,
``step``), so a checkpoint moves between this class and bitsandbytes, CPU and GPU, unchanged.
Parameters bitsandbytes keeps in 32-bit (fewer than ``min_8bit_size`` elements) and options this
path does not implement (``max_unorm``, ``skip_zeros``) take bitsandbytes' own update.
"""

from __future__ import annotations

import math

import bitsandbytes as bnb
import torch
from torch import Tensor

BLOCK = 256  # bitsandbytes' blockwise quantization block for optimizer states


class NearestCodeQuantizer:
    """Blockwise absmax quantization to the nearest value of a sorted 256-entry code map."""

    KEY_BITS = 16

    def __init__(self, code: Tensor) -> None:
        code = code.detach().float().cpu()
        if code.numel() != 256 or not bool((code[1:] > code[:-1]).all()):
            raise ValueError("the code map must hold 256 strictly increasing values")
        mids = (code[1:].double() + code[:-1].double()) / 2
        # midpoint i separates code i and i + 1; +inf after the last keeps every lookup in range
        self.mids = torch.cat([mids.float(), torch.tensor([math.inf])])
        shift = 32 - self.KEY_BITS
        keys = torch.arange(1 << self.KEY_BITS, dtype=torch.int64)
        first = (keys << shift).to(torch.int32).view(torch.float32)  # wraps to the sign bit as float32 does
        last = ((keys << shift) + (1 << shift) - 1).to(torch.int32).view(torch.float32)
        lo = torch.nan_to_num(torch.minimum(first, last), nan=0.0).clamp(-1, 1)
        hi = torch.nan_to_num(torch.maximum(first, last), nan=0.0).clamp(-1, 1)
        # every float whose top bits are `key` rounds to a code in [lut[key], lut[key] + spread]
        start = torch.searchsorted(mids.float(), lo, right=False)
        self.spread = int((torch.searchsorted(mids.float(), hi, right=False) - start).max())
        self.lut = start.to(torch.int32)
        self.shift = shift

    def codes(self, normalized: Tensor) -> Tensor:
        """Nearest-code indices (int32) of values in [-1, 1] (or [0, 1] for an unsigned map)."""
        key = (normalized.view(torch.int32) >> self.shift) & ((1 << self.KEY_BITS) - 1)
        idx = self.lut.index_select(0, key.flatten())
        flat = normalized.flatten()
        for _ in range(self.spread):
            idx += flat > self.mids.index_select(0, idx)
        return idx

    def quantize_(self, values: Tensor, codes_out: Tensor, absmax_out: Tensor) -> None:
        """Quantize ``values`` (1-D, whole blocks) into ``codes_out`` (uint8) and ``absmax_out``."""
        blocks = values.view(-1, BLOCK)
        absmax = blocks.abs().amax(dim=1)
        inverse = torch.where(absmax > 0, absmax.reciprocal(), 0.0)
        normalized = blocks * inverse[:, None]
        codes_out.copy_(self.codes(normalized))
        absmax_out.copy_(absmax)


class AdamW8bit(bnb.optim.AdamW8bit):
    """``bitsandbytes.optim.AdamW8bit``; on CPU the 8-bit update runs chunked (see the module doc)."""

    def __init__(self, params, *args, chunk_elements: int = 1 << 18, **kwargs) -> None:
        if chunk_elements <= 0 or chunk_elements % BLOCK:
            raise ValueError(f"chunk_elements must be a positive multiple of {BLOCK}, got {chunk_elements}")
        super().__init__(params, *args, **kwargs)
        self.chunk_elements = chunk_elements
        self._quantizers: dict[bytes, NearestCodeQuantizer] = {}

    def _quantizer(self, code: Tensor) -> NearestCodeQuantizer:
        # keyed by the map's values: a loaded state dict gives every parameter its own copy of the
        # two maps, which must not cost a 256 KiB table each
        key = code.detach().cpu().numpy().tobytes()
        if key not in self._quantizers:
            self._quantizers[key] = NearestCodeQuantizer(code)
        return self._quantizers[key]

    @torch.no_grad()
    def update_step(self, group, p, gindex, pindex):
        state = self.state[p]
        config = self.get_config(gindex, pindex, group)
        if (
            p.device.type != "cpu"
            or state["state1"].dtype != torch.uint8
            or config["max_unorm"] > 0.0
            or config["skip_zeros"]
        ):
            return super().update_step(group, p, gindex, pindex)
        p.data = p.data.contiguous()
        p.grad = p.grad.contiguous()
        state["step"] += 1
        beta1, beta2 = config["betas"][0], config["betas"][1]
        lr, eps, weight_decay, step = config["lr"], config["eps"], config["weight_decay"], state["step"]
        step_size = lr / (1.0 - beta1**step)
        bias_correction2 = math.sqrt(1.0 - beta2**step)
        quant1, quant2 = self._quantizer(state["qmap1"]), self._quantizer(state["qmap2"])

        param, grad = p.data.view(-1), p.grad.view(-1)
        state1, state2 = state["state1"].view(-1), state["state2"].view(-1)
        absmax1, absmax2 = state["absmax1"], state["absmax2"]
        n = param.numel()
        chunk = self.chunk_elements * max(1, torch.get_num_threads())
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            blocks = slice(start // BLOCK, -(-end // BLOCK))
            g = grad[start:end].float()
            m = torch.ops.bitsandbytes.dequantize_blockwise(
                state1[start:end], absmax1[blocks], state["qmap1"], BLOCK, torch.float32
            )
            v = torch.ops.bitsandbytes.dequantize_blockwise(
                state2[start:end], absmax2[blocks], state["qmap2"], BLOCK, torch.float32
            )
            m.mul_(beta1).add_(g, alpha=1.0 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            denom = v.sqrt().div_(bias_correction2).add_(eps)
            w = param[start:end]
            w32 = w.float()  # w itself when fp32: the update then lands in place
            if weight_decay > 0.0:
                w32.mul_(1.0 - lr * weight_decay)
            w32.addcdiv_(m, denom, value=-step_size)
            if w32 is not w:
                w.copy_(w32)
            quantize_into(quant1, m, state1[start:end], absmax1[blocks])
            quantize_into(quant2, v, state2[start:end], absmax2[blocks])


def quantize_into(quantizer: NearestCodeQuantizer, values: Tensor, codes: Tensor, absmax: Tensor) -> None:
    """Quantize 1-D ``values`` of any length into ``codes`` (same length) and one ``absmax`` per 256-block."""
    ragged = values.numel() % BLOCK
    if not ragged:
        quantizer.quantize_(values, codes, absmax)
        return
    # the last block of a tensor may be short: quantize it zero-padded (zeros never raise an absmax)
    padded = torch.nn.functional.pad(values, (0, BLOCK - ragged))
    full_codes = torch.empty(padded.numel(), dtype=torch.uint8)
    quantizer.quantize_(padded, full_codes, absmax)
    codes.copy_(full_codes[: values.numel()])
