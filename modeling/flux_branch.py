"""The FLUX condition branch: condition tokens as a third stream through a diffusers ``FluxTransformer2DModel``.

``condition_forward(transformer, ...)`` runs the diffusers model's own modules (embedders, blocks' norms,
projections, QK-norms, MLPs, output layer) in an order that adds the OminiControl-style condition stream of
SPEC §2:

- condition tokens go through the *image* stream's weights (``x_embedder``, ``norm1``, ``attn.to_q/k/v``,
  ``attn.to_out.0``, ``ff`` in double blocks; ``norm``, ``proj_mlp``, ``proj_out``, ``attn.to_q/k/v`` in
  single blocks) with their own AdaLN modulation, computed from the time embedding at t = 0 (same guidance
  and pooled text); their RoPE ids are the image ids;
- every attention op sees ``[text | image | condition]`` with full attention both ways; each stream takes its
  slice back afterwards; only image tokens reach ``norm_out`` / ``proj_out``;
- the LoRA of ``add_condition_lora`` acts on condition tokens only.

How the LoRA is kept off the image and text tokens, cheaply: every LoRA target is called through
``_project``, which multiplies *all* rows (image + condition, or text + image + condition) by the frozen
base weight in one GEMM and then adds ``B(A(x_cond)) * scaling`` to the condition rows only. A
layer therefore costs one big base GEMM plus a rank-4 update on a third or half of the rows, instead of
peft's two paths (base + LoRA on every token) or running the layer twice. The peft ``lora.Linear`` wrapper
is used as a weight container (``base_layer``, ``lora_A``, ``lora_B``, ``scaling``) and its ``forward`` is
never called, so the same model object also works as a plain diffusers FLUX with the adapter loaded.

Other speed choices: q/k/v of a stream are one GEMM (trainable weights concatenated on the fly so that
``full`` mode trains them; frozen ones fused once into a shared buffer, see ``_fused_base``); in single
blocks q/k/v and the MLP input projection share that GEMM, as in the original FLUX; the image and
condition streams of the double blocks are held as one ``(B, 2, N, D)`` tensor, so their shared weights
run as one GEMM and their per-stream modulation is a broadcast, not a copy; the two AdaLN embeddings
(t and 0) are one batched call. Condition K/V cannot be cached across steps or layers: with attention
full both ways the condition tokens read the noisy image tokens in every layer.

Checkpointing per block: "none", "full" (recompute the whole block, as diffusers does), or "selective"
(save matmul and attention outputs, recompute the cheap elementwise ops: norms, modulation, GELU, RoPE).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel
from diffusers.models.embeddings import apply_rotary_emb
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from modeling.attention import attention

Checkpointing = Literal["none", "selective", "full"]

# SPEC §2's LoRA targets as one full-name regex (peft matches a string with re.fullmatch). Spelled out per
# block type because a suffix list would also catch the top-level ``proj_out`` and ``norm_out.linear``.
LORA_TARGETS = (
    r"x_embedder"
    r"|transformer_blocks\.\d+\.(norm1\.linear|attn\.to_q|attn\.to_k|attn\.to_v|attn\.to_out\.0|ff\.net\.2)"
    r"|single_transformer_blocks\.\d+\.(norm\.linear|proj_mlp|proj_out|attn\.to_q|attn\.to_k|attn\.to_v)"
)


def condition_lora_config(rank: int = 4, alpha: float = 4.0) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=LORA_TARGETS)


def add_condition_lora(transformer: FluxTransformer2DModel, rank: int = 4, alpha: float = 4.0) -> None:
    """Wrap SPEC §2's targets with a peft LoRA (adapter "default"); only the LoRA weights stay trainable."""
    transformer.add_adapter(condition_lora_config(rank, alpha))


def lora_parameters(transformer: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in transformer.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def _base_and_lora(layer: nn.Module) -> tuple[nn.Linear, list[tuple[Tensor, Tensor, float]]]:
    """The frozen ``nn.Linear`` behind ``layer`` and its active LoRA factors ``(A, B, scaling)``."""
    if not isinstance(layer, LoraLayer):
        return layer, []
    if layer.merged:
        raise RuntimeError("condition LoRA must not be merged into the base weights: image tokens would see it")
    if layer.disable_adapters:
        return layer.base_layer, []
    loras = [
        (layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name])
        for name in layer.active_adapters
        if name in layer.lora_A
    ]
    return layer.base_layer, loras


def _fused_base(bases: Sequence[nn.Linear]) -> tuple[Tensor, Tensor | None]:
    """One (sum out, in) weight and bias for a group of Linears that read the same input.

    Trainable weights are concatenated on every call (gradients must reach each Linear). Frozen weights are
    concatenated once, and each Linear's weight/bias is re-pointed at its rows of the fused buffer: no
    second copy in memory and no per-step concatenation (which costs as much as a GEMM at small token
    counts). A data-pointer check re-fuses after anything replaces the tensors (``.to()``, dtype casts).
    """
    if len(bases) == 1:
        return bases[0].weight, bases[0].bias
    weights = [b.weight for b in bases]
    has_bias = bases[0].bias is not None
    if any(w.requires_grad or w.is_meta or hasattr(w, "ds_id") for w in weights):  # ds_id: ZeRO-3 shard
        return torch.cat(weights), torch.cat([b.bias for b in bases]) if has_bias else None
    cached = bases[0].__dict__.get("_fused_frozen")
    if cached is None or cached[2] != [w.data_ptr() for w in weights]:
        weight = torch.cat([w.detach() for w in weights])
        bias = torch.cat([b.bias.detach() for b in bases]) if has_bias else None
        row = 0
        for b in bases:
            b.weight.data = weight[row : row + b.out_features]
            if has_bias:
                b.bias.data = bias[row : row + b.out_features]
            row += b.out_features
        cached = (weight, bias, [b.weight.data_ptr() for b in bases])
        bases[0].__dict__["_fused_frozen"] = cached
    return cached[0], cached[1]


def _project(layers: Sequence[nn.Module], x: Tensor, cond: int | None, inplace: bool) -> Tensor:
    """``cat([layer(x) for layer in layers], -1)`` with the base weights on every row of ``x`` and the LoRA
    update only on the condition rows ``x[:, cond:]`` (``None``: there are none).

    ``inplace`` adds the update into the GEMM output; selective checkpointing keeps that output and would
    see the addition twice, so it needs the out-of-place form (one more pass over the output)."""
    parts = [_base_and_lora(layer) for layer in layers]
    weight, bias = _fused_base([base for base, _ in parts])
    y = F.linear(x, weight, bias)
    if cond is None or not any(loras for _, loras in parts):
        return y
    # one rank-(sum r) update for the whole group: A's stacked, B's block-diagonal (zero block where a layer
    # has no LoRA), so fused q/k/v(/mlp) need two small GEMMs in all
    a_rows, b_blocks = [], []
    for base, loras in parts:
        if not loras:
            b_blocks.append(y.new_zeros(base.out_features, 0))
        for a, b, scaling in loras:
            a_rows.append(a)
            b_blocks.append(b * scaling)
    a_all = a_rows[0] if len(a_rows) == 1 else torch.cat(a_rows)
    b_all = b_blocks[0] if len(b_blocks) == 1 else torch.block_diag(*b_blocks)
    delta = F.linear(F.linear(x[:, cond:].to(a_all.dtype), a_all), b_all).to(y.dtype)
    if inplace:
        y[:, cond:] += delta
        return y
    return torch.cat([y[:, :cond], y[:, cond:] + delta], dim=1)


def _per_stream(x: Tensor, lengths: Sequence[int], fn: Callable[[Tensor, int], Tensor]) -> Tensor:
    """Apply ``fn(part, stream_index)`` to consecutive token segments of ``x`` (dim 1) and rejoin them."""
    if len(lengths) == 1:
        return fn(x, 0)
    return torch.cat([fn(part, i) for i, part in enumerate(x.split(list(lengths), dim=1))], dim=1)


def _attention(q: Tensor, k: Tensor, v: Tensor, rope: tuple[Tensor, Tensor], key_mask: Tensor | None) -> Tensor:
    """(B, L, H, hd) each -> (B, L, H*hd); joint full attention with FLUX's RoPE. ``key_mask`` (B, 1, 1, L)
    bool hides padded text keys (None: every key is real)."""
    q = apply_rotary_emb(q, rope, sequence_dim=1)
    k = apply_rotary_emb(k, rope, sequence_dim=1)
    out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), key_mask).transpose(1, 2)
    return out.flatten(2, 3).to(q.dtype)


def _double_block(
    block: nn.Module,
    txt: Tensor,
    x: Tensor,
    temb: Tensor,
    mod_in: Tensor,
    rope: tuple[Tensor, Tensor],
    key_mask: Tensor | None,
    inplace: bool,
) -> tuple[Tensor, Tensor]:
    """txt (B, T, D); x (B, S, N, D): stream 0 = image, stream 1 = condition (if S == 2);
    mod_in (B, S, D) = SiLU of the image / condition time embeddings."""
    batch, streams, n, dim = x.shape
    cond = 1 if streams == 2 else None
    attn = block.attn
    heads, head_dim = dim // attn.head_dim, attn.head_dim

    mod = _project([block.norm1.linear], mod_in, cond, inplace)[:, :, None]  # (B, S, 1, 6D)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
    x_norm = block.norm1.norm(x) * (1 + scale_msa) + shift_msa
    txt_norm, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(txt, emb=temb)

    qkv = (
        _project([attn.to_q, attn.to_k, attn.to_v], x_norm, cond, inplace)
        .flatten(1, 2)
        .unflatten(-1, (3, heads, head_dim))
    )
    txt_qkv = _project([attn.add_q_proj, attn.add_k_proj, attn.add_v_proj], txt_norm, None, inplace)
    txt_qkv = txt_qkv.unflatten(-1, (3, heads, head_dim))
    q = torch.cat([attn.norm_added_q(txt_qkv[:, :, 0]), attn.norm_q(qkv[:, :, 0])], dim=1)
    k = torch.cat([attn.norm_added_k(txt_qkv[:, :, 1]), attn.norm_k(qkv[:, :, 1])], dim=1)
    v = torch.cat([txt_qkv[:, :, 2], qkv[:, :, 2]], dim=1)
    txt_attn, x_attn = _attention(q, k, v, rope, key_mask).split([txt.shape[1], streams * n], dim=1)

    x_attn = attn.to_out[1](_project([attn.to_out[0]], x_attn.unflatten(1, (streams, n)), cond, inplace))
    x = x + gate_msa * x_attn
    x_norm = block.norm2(x) * (1 + scale_mlp) + shift_mlp
    gelu = block.ff.net[0]
    hidden = block.ff.net[1](F.gelu(_project([gelu.proj], x_norm, None, inplace), approximate=gelu.approximate))
    x = x + gate_mlp * _project([block.ff.net[2]], hidden, cond, inplace)

    txt = txt + c_gate_msa[:, None] * attn.to_add_out(txt_attn)
    txt_norm = block.norm2_context(txt) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
    txt = txt + c_gate_mlp[:, None] * block.ff_context(txt_norm)
    return txt, x


def _single_block(
    block: nn.Module,
    h: Tensor,
    mod_in: Tensor,
    rope: tuple[Tensor, Tensor],
    key_mask: Tensor | None,
    lengths: tuple[int, ...],
    inplace: bool,
) -> Tensor:
    """h (B, L, D) = [text | image | condition]; ``lengths`` = (T + N,) or (T + N, N): text and image share
    stream 0's modulation, condition tokens take stream 1's."""
    dim = h.shape[-1]
    attn = block.attn
    heads, head_dim = dim // attn.head_dim, attn.head_dim
    cond = lengths[0] if len(lengths) == 2 else None

    mod = _project([block.norm.linear], mod_in, None if cond is None else 1, inplace)
    shift, scale, gate = (m[:, :, None] for m in mod.chunk(3, dim=-1))  # (B, S, 1, D) each
    h_norm = _per_stream(block.norm.norm(h), lengths, lambda part, i: part * (1 + scale[:, i]) + shift[:, i])

    fused = _project([attn.to_q, attn.to_k, attn.to_v, block.proj_mlp], h_norm, cond, inplace)
    qkv, mlp = fused.split([3 * dim, block.mlp_hidden_dim], dim=-1)
    q, k, v = qkv.unflatten(-1, (3, heads, head_dim)).unbind(2)
    attn_out = _attention(attn.norm_q(q), attn.norm_k(k), v, rope, key_mask)

    out = _project([block.proj_out], torch.cat([attn_out, block.act_mlp(mlp)], dim=-1), cond, inplace)
    return h + _per_stream(out, lengths, lambda part, i: gate[:, i] * part)


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    name = str(op)
    if name.startswith(("aten.mm", "aten.addmm", "aten.bmm")) or "scaled_dot_product" in name:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _run_block(fn: Callable, args: tuple, checkpointing: Checkpointing):
    if checkpointing == "none" or not torch.is_grad_enabled():
        return fn(*args)
    if checkpointing == "full":
        return checkpoint(fn, *args, use_reentrant=False)
    context = functools.partial(create_selective_checkpoint_contexts, _selective_policy)
    return checkpoint(fn, *args, use_reentrant=False, context_fn=context)


def condition_forward(
    transformer: FluxTransformer2DModel,
    hidden_states: Tensor,
    encoder_hidden_states: Tensor,
    pooled_projections: Tensor,
    timestep: Tensor,
    img_ids: Tensor,
    txt_ids: Tensor,
    guidance: Tensor | None = None,
    cond_tokens: Tensor | None = None,
    checkpointing: Checkpointing = "none",
    text_mask: Tensor | None = None,
) -> Tensor:
    """FLUX velocity for the image tokens, with an optional condition stream.

    Arguments as ``FluxTransformer2DModel.forward`` (``timestep`` and ``guidance`` unscaled: t in [0, 1]),
    plus ``cond_tokens`` (B, N, in_channels): packed condition latents at the image's positions (same N), and
    ``text_mask`` (B, T) bool, False = a padding token that no other token may attend to (None: all real).
    Masking the padding makes a sample's output independent of the longest caption in its batch, so training
    (rows padded per batch) and serving (one prompt, or a batch) see the same text.
    Returns (B, N, out_channels). Without ``cond_tokens`` this equals the diffusers forward of the
    un-adapted model, LoRA loaded or not.
    """
    tf = transformer
    dtype = hidden_states.dtype
    if cond_tokens is not None and cond_tokens.shape[:2] != hidden_states.shape[:2]:
        raise ValueError(
            f"condition tokens {tuple(cond_tokens.shape)} must match the image tokens {tuple(hidden_states.shape)}"
        )
    streams = 1 if cond_tokens is None else 2
    inplace = checkpointing != "selective"
    tokens = hidden_states[:, None] if cond_tokens is None else torch.stack([hidden_states, cond_tokens], dim=1)
    x = _project([tf.x_embedder], tokens, None if cond_tokens is None else 1, inplace=True)

    # time embeddings at t (image, text) and at 0 (condition) in one batched call
    times = timestep.to(dtype) * 1000
    pooled = pooled_projections
    if cond_tokens is not None:
        times = torch.cat([times, torch.zeros_like(times)])
        pooled = torch.cat([pooled, pooled])
    if guidance is None:
        embs = tf.time_text_embed(times, pooled)
    else:
        scaled_guidance = guidance.to(dtype) * 1000
        embs = tf.time_text_embed(times, scaled_guidance.repeat(streams), pooled)
    embs = embs.unflatten(0, (streams, -1)).transpose(0, 1)  # (B, S, D)
    temb = embs[:, 0]
    mod_in = F.silu(embs)

    txt = tf.context_embedder(encoder_hidden_states)
    ids = torch.cat([txt_ids] + [img_ids] * streams, dim=0)
    rope = tf.pos_embed(ids)
    key_mask = None
    if text_mask is not None:
        image_keys = text_mask.new_ones(text_mask.shape[0], streams * hidden_states.shape[1])
        key_mask = torch.cat([text_mask.bool(), image_keys], dim=1)[:, None, None, :]

    for block in tf.transformer_blocks:
        txt, x = _run_block(_double_block, (block, txt, x, temb, mod_in, rope, key_mask, inplace), checkpointing)

    text_len, n = txt.shape[1], hidden_states.shape[1]
    h = torch.cat([txt, x.flatten(1, 2)], dim=1)
    lengths = (text_len + n,) if cond_tokens is None else (text_len + n, n)
    for block in tf.single_transformer_blocks:
        h = _run_block(_single_block, (block, h, mod_in, rope, key_mask, lengths, inplace), checkpointing)

    image = h[:, text_len : text_len + n]
    return tf.proj_out(tf.norm_out(image, temb))
