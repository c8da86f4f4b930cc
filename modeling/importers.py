"""The papers' released checkpoints as faceforge weights: official state dicts -> ours, plus the file reading.

Pure conversion functions (``mmface_dit_from_official``, ``mogle_from_official``, ``lora_from_official``) and two
entry points that read the released files and write a weights folder (config.json + model.safetensors, the
trainer's layout, so that serving and ``init_from=`` read it like a checkpoint's ``weights/``):
``import_mmface_dit`` and ``import_face_mogle``. Every official tensor is used exactly once: a key that is
missing, left over or of the wrong shape is an error naming the file and the key.

MMFace-DiT (``dit_model_weights_ema.safetensors``: the EMA ``state_dict`` of the public code's
``UnifiedDualStreamDiT``, flow or DDPM variant, same keys). Official -> ours, ``blocks.{i}`` for every block::

    x_embedder.proj.{weight,bias}              x_embedder.{weight,bias}        Conv2d on cat([x, cond]) both
    t_embedder.mlp.{0,2}.{weight,bias}         t_embedder.mlp.{0,2}.*
    c_embedder.proj.{weight,bias}              caption_embedder.proj.*
    c_embedder.null_feature_pooled             caption_embedder.null = proj.weight @ null + proj.bias
    clip_seq_proj.{weight,bias}                text_embedder.*
    modality_embedder.weight                   modality_embedder.weight        0 mask, 1 sketch in both
    blocks.{i}.adaLN_modulation.1.*            blocks.{i}.adaLN_modulation.1.* same 12-way chunk order
    blocks.{i}.attn.to_{q,k,v}.weight          blocks.{i}.img_qkv.weight = [P q; P k; v]
    blocks.{i}.attn.to_{q,k,v}_t.weight        blocks.{i}.txt_qkv.weight = [P q_t; P k_t; v_t]
    blocks.{i}.attn.to_out{,_t}.weight         blocks.{i}.{img,txt}_out.weight
    blocks.{i}.mlp_{i,t}.{0,2}.*               blocks.{i}.{img,txt}_mlp.{0,2}.*
    final_layer.adaLN_modulation.1.*           final_layer.adaLN_modulation.1.*
    final_layer.linear.*                       final_layer.linear.*

``P`` moves the q/k output rows of each head from the public code's RoPE layout to ours (``rope_row_permutation``).
The public code keeps its null caption in *input* space (it replaces the pooled CLIP vector before the
projection); ours keeps it in output space, hence the affine image of the null vector. Three behaviours of the
public code are carried in the config rather than the weights: text tokens have all-zero RoPE positions
(``text_rope: false``); the flow variant embeds ``999 * t`` where our objective feeds ``1000 * t``
(``timestep_scale: 0.999``); latents are ``z * scale`` without the FLUX VAE's shift (the codec entry carries
``"shift": 0.0``).

Face-MoGLE (``pytorch_lora_weights.safetensors`` + ``global_local_mask_moe.pt``). The LoRA file is diffusers'
``transformer.<module>.lora_{A,B}.weight``, the names ours saves too; in the weights folder each becomes the
parameter name of a lora-mode ``FaceMoGLE`` (``transformer.<module>.lora_{A,B}.default.weight``). The MoGLE file
is the public ``MoGLE.state_dict()``; official -> ours (``mogle.`` prefixed in the weights folder)::

    global_expert.net.0.weight (H, D)          experts.w1[0] = weight.T (D, H)
    global_expert.net.0.bias                   experts.b1[0]
    global_expert.net.2.weight (D, H)          experts.w2[0] = weight.T (H, D)
    global_expert.net.2.bias                   experts.b2[0]
    local_experts.{c}.net.*                    experts.*[1 + c]                 c = CelebAMask-HQ class 0..18
    gating.noise_proj.*                        gate.latent_proj.*
    gating.timestep_embedding.linear_{1,2}.*   gate.time_mlp.{0,2}.*
    gating.gate.{0,2}.*                        gate.mlp.{0,2}.*

The public gate was trained on the sinusoid of t in [0, 1] itself (its ``Timesteps(64)`` has no scale) where ours
embeds ``1000 * t``, hence ``mogle.time_scale: 1`` in the imported config. The base transformer stays where it is
(``base_from``); only its config.json is read, to check that it is the architecture of the preset.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from modeling.mmface_dit import MMFaceDiTConfig
from modeling.mogle import NUM_LOCAL, MoGLEConfig

MMFACE_OBJECTIVES = ("rfm", "ddpm")
# the public flow code embeds 999 * t; our flow objective hands the network 1000 * t
PUBLIC_FLOW_TIMESTEP_SCALE = 0.999
ADAPTER_FILE = "adapter.safetensors"

# (official module, our module) renamed one to one, every parameter the module has (weight, bias)
MMFACE_TOP_RENAMES = (
    ("x_embedder.proj", "x_embedder"),
    ("t_embedder.mlp.0", "t_embedder.mlp.0"),
    ("t_embedder.mlp.2", "t_embedder.mlp.2"),
    ("c_embedder.proj", "caption_embedder.proj"),
    ("clip_seq_proj", "text_embedder"),
    ("modality_embedder", "modality_embedder"),
    ("final_layer.adaLN_modulation.1", "final_layer.adaLN_modulation.1"),
    ("final_layer.linear", "final_layer.linear"),
)
MMFACE_BLOCK_RENAMES = (
    ("adaLN_modulation.1", "adaLN_modulation.1"),
    ("attn.to_out", "img_out"),
    ("attn.to_out_t", "txt_out"),
    ("mlp_i.0", "img_mlp.0"),
    ("mlp_i.2", "img_mlp.2"),
    ("mlp_t.0", "txt_mlp.0"),
    ("mlp_t.2", "txt_mlp.2"),
)
MOGLE_GATE_RENAMES = (
    ("gating.noise_proj", "gate.latent_proj"),
    ("gating.timestep_embedding.linear_1", "gate.time_mlp.0"),
    ("gating.timestep_embedding.linear_2", "gate.time_mlp.2"),
    ("gating.gate.0", "gate.mlp.0"),
    ("gating.gate.2", "gate.mlp.2"),
)


# ------------------------------------------------------------------------------------------------ reading


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


def read_safetensors(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, header metadata) of a safetensors file; a damaged or foreign file is a ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as error:
        raise ValueError(f"{path}: not a readable safetensors file ({_first_line(error)})") from None
    return tensors, metadata


def read_torch_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A ``torch.save``-d state dict, read with ``weights_only=True`` (no arbitrary unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    # torch.load reports a truncated or foreign file as any of these, depending on where it stops making sense
    except (RuntimeError, KeyError, EOFError, ValueError, pickle.UnpicklingError) as error:
        raise ValueError(f"{path}: not a readable PyTorch state dict ({_first_line(error)})") from None
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path}: holds a {type(loaded).__name__}, expected a state dict (name -> tensor)")
    foreign = [k for k, v in loaded.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if foreign:
        raise ValueError(f"{path}: entry {foreign[0]!r} is not a named tensor; expected a state dict")
    return dict(loaded)


class OfficialTensors:
    """An official state dict that hands out each tensor once, checks its shape, and names what is left over."""

    def __init__(self, tensors: Mapping[str, Tensor], source: str) -> None:
        self.tensors = dict(tensors)
        self.source = source
        self.taken: set[str] = set()

    def take(self, key: str, shape: Iterable[int]) -> Tensor:
        if key not in self.tensors:
            raise ValueError(f"{self.source}: missing official key {key!r}")
        if key in self.taken:
            raise RuntimeError(f"official key {key!r} taken twice")  # a bug in a mapping table, not in the file
        tensor = self.tensors[key]
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(
                f"{self.source}: official key {key!r} has shape {tuple(tensor.shape)}, expected {tuple(shape)} "
                "(is the preset right?)"
            )
        self.taken.add(key)
        return tensor

    def check_all_used(self) -> None:
        left = sorted(set(self.tensors) - self.taken)
        if left:
            more = f" and {len(left) - 5} more" if len(left) > 5 else ""
            raise ValueError(f"{self.source}: unexpected official keys {left[:5]}{more} (is the preset right?)")


def _take_module(
    src: OfficialTensors, ours: dict[str, Tensor], shapes: Mapping[str, torch.Size], official: str, module: str
) -> None:
    """Copy every parameter of our ``module`` (per ``shapes``) from the same-named one of the ``official`` module."""
    names = [k for k in shapes if k.rsplit(".", 1)[0] == module]
    if not names:
        raise RuntimeError(f"our model has no module {module!r}")  # a bug in a mapping table
    for key in names:
        ours[key] = src.take(f"{official}.{key.rsplit('.', 1)[1]}", shapes[key])


def _check_complete(ours: Mapping[str, Tensor], shapes: Mapping[str, torch.Size]) -> None:
    missing = sorted(set(shapes) - set(ours))
    if missing:
        raise RuntimeError(f"conversion left our parameters {missing[:5]} unset")  # a bug in a mapping table


# ---------------------------------------------------------------------------------------------- MMFace-DiT


def rope_row_permutation(head_dim: int) -> Tensor:
    """``perm`` with ``ours[j] = official[perm[j]]`` over the q (or k) output channels of one head.

    Both codes rotate channel pairs by the same list of angles: the row frequencies
    ``10000 ** (-2i / (D/2))`` for i < D/4, then the same frequencies for the column. The public code (FLUX's
    ``apply_rope``) pairs channels ``(2i, 2i + 1)``; ours (``modeling/rope.py``, rotate-half) pairs ``(i, i + D/2)``,
    each rotated as ``(a cos - b sin, a sin + b cos)``. So our channel ``i`` is their ``2i`` and our ``i + D/2`` is
    their ``2i + 1``: evens, then odds. q and k move alike, so every attention logit is unchanged; v keeps its
    order (the output projection reads it as it is).
    """
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def rope_rows_to_rotate_half(weight: Tensor, num_heads: int) -> Tensor:
    """A q or k projection (heads * D, in) with its rows reordered, head by head, into our RoPE pair layout."""
    out_features, in_features = weight.shape
    head_dim = out_features // num_heads
    per_head = weight.reshape(num_heads, head_dim, in_features)
    return per_head[:, rope_row_permutation(head_dim)].reshape(out_features, in_features)


def null_caption_in_output_space(weight: Tensor, bias: Tensor, null_feature: Tensor) -> Tensor:
    """Our null vector (hidden,) = what the public projection makes of its null *input* feature."""
    null = weight.double() @ null_feature.double() + bias.double()
    return null.to(weight.dtype)


def mmface_dit_import_config(preset: str, objective: str) -> MMFaceDiTConfig:
    """A preset's config, set up to behave as the public code: no text RoPE, its flow time scale."""
    from modeling.mmface_dit import PRESETS

    if preset not in PRESETS:
        raise KeyError(f"unknown MMFace-DiT preset {preset!r}; known presets: {', '.join(sorted(PRESETS))}")
    if objective not in MMFACE_OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(MMFACE_OBJECTIVES)}, got {objective!r}")
    scale = PUBLIC_FLOW_TIMESTEP_SCALE if objective == "rfm" else 1.0
    return dataclasses.replace(PRESETS[preset], text_rope=False, timestep_scale=scale)


def mmface_dit_from_official(
    official: Mapping[str, Tensor], cfg: MMFaceDiTConfig, source: str = "checkpoint"
) -> dict[str, Tensor]:
    """Our ``MMFaceDiT`` state dict from the public code's; see the module docstring for the table."""
    from modeling.mmface_dit import build

    shapes = {k: v.shape for k, v in build(cfg, device="meta").state_dict().items()}
    src = OfficialTensors(official, source)
    ours: dict[str, Tensor] = {}
    for theirs, mine in MMFACE_TOP_RENAMES:
        _take_module(src, ours, shapes, theirs, mine)
    ours["caption_embedder.null"] = null_caption_in_output_space(
        ours["caption_embedder.proj.weight"],
        ours["caption_embedder.proj.bias"],
        src.take("c_embedder.null_feature_pooled", (cfg.pooled_dim,)),
    )
    h = cfg.hidden_size
    for i in range(cfg.depth):
        block = f"blocks.{i}"
        for theirs, mine in MMFACE_BLOCK_RENAMES:
            _take_module(src, ours, shapes, f"{block}.{theirs}", f"{block}.{mine}")
        for stream, suffix in (("img", ""), ("txt", "_t")):
            q, k, v = (src.take(f"{block}.attn.to_{name}{suffix}.weight", (h, h)) for name in "qkv")
            ours[f"{block}.{stream}_qkv.weight"] = torch.cat(
                [rope_rows_to_rotate_half(q, cfg.num_heads), rope_rows_to_rotate_half(k, cfg.num_heads), v]
            )
    src.check_all_used()
    _check_complete(ours, shapes)
    return ours


# ---------------------------------------------------------------------------------------------- Face-MoGLE


def face_mogle_import_config(preset: str):
    """A preset's config in lora mode, its gate embedding t in [0, 1] unscaled as the public gate was trained."""
    from modeling.face_mogle import resolve_config

    cfg = resolve_config(preset)
    return dataclasses.replace(cfg, mode="lora", mogle=dataclasses.replace(cfg.mogle, time_scale=1.0))


def mogle_from_official(
    official: Mapping[str, Tensor], cfg: MoGLEConfig, source: str = "checkpoint"
) -> dict[str, Tensor]:
    """Our ``MoGLE`` state dict (no prefix) from the public ``MoGLE.state_dict()`` (experts + dynamic gate)."""
    from modeling.mogle import MoGLE

    if not cfg.expert_mlp or cfg.gating != "dynamic" or cfg.experts != "global+local":
        raise ValueError(f"the released MoGLE has MLP experts, a dynamic gate and all 20 experts; config: {cfg}")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in MoGLE(cfg).state_dict().items()}
    src = OfficialTensors(official, source)
    d, hidden = cfg.token_dim, cfg.hidden
    experts = ["global_expert"] + [f"local_experts.{c}" for c in range(NUM_LOCAL)]
    # nn.Linear keeps (out, in); the expert bank multiplies tokens from the left, so it keeps (in, out)
    ours = {
        "experts.w1": torch.stack([src.take(f"{e}.net.0.weight", (hidden, d)).T for e in experts]),
        "experts.b1": torch.stack([src.take(f"{e}.net.0.bias", (hidden,)) for e in experts]),
        "experts.w2": torch.stack([src.take(f"{e}.net.2.weight", (d, hidden)).T for e in experts]),
        "experts.b2": torch.stack([src.take(f"{e}.net.2.bias", (d,)) for e in experts]),
    }
    for theirs, mine in MOGLE_GATE_RENAMES:
        _take_module(src, ours, shapes, theirs, mine)
    src.check_all_used()
    _check_complete(ours, shapes)
    return ours


_ADAPTER_NAME = re.compile(r"\.(lora_[AB])\.default\.")


def lora_from_official(
    official: Mapping[str, Tensor], lora_shapes: Mapping[str, torch.Size], source: str = "checkpoint"
) -> dict[str, Tensor]:
    """Our LoRA parameters (``transformer.<module>.lora_A.default.weight``, ...) from diffusers' file names
    (``transformer.<module>.lora_A.weight``); ``lora_shapes`` are the lora-mode model's, by our names."""
    src = OfficialTensors(official, source)
    ours = {key: src.take(_ADAPTER_NAME.sub(r".\1.", key), shape) for key, shape in lora_shapes.items()}
    src.check_all_used()
    return ours


def check_lora_header(metadata: Mapping[str, str], rank: int, alpha: float, source: str) -> None:
    """When the file says which LoRA it holds (newer diffusers write ``lora_adapter_metadata``), it must be ours."""
    if "lora_adapter_metadata" not in metadata:
        return
    saved = json.loads(metadata["lora_adapter_metadata"])
    found = (saved.get("transformer.r", rank), saved.get("transformer.lora_alpha", alpha))
    if (int(found[0]), float(found[1])) != (rank, float(alpha)):
        raise ValueError(f"{source}: LoRA rank/alpha {found} in its header, the preset has ({rank}, {alpha})")


def check_flux_base(base: str | Path, flux) -> Path:
    """The base folder's transformer config.json (diffusers FLUX root or its ``transformer/``) fits the preset."""
    base = Path(base)
    candidates = (base / "transformer" / "config.json", base / "config.json")
    config_path = next((p for p in candidates if p.is_file()), None)
    if config_path is None:
        raise FileNotFoundError(f"{base}: no transformer/config.json or config.json; expected a diffusers FLUX folder")
    found = json.loads(config_path.read_text())
    for key, expected in flux.kwargs().items():
        value = found.get(key)
        if (list(value) if isinstance(value, list | tuple) else value) != (
            list(expected) if isinstance(expected, tuple) else expected
        ):
            raise ValueError(f"{config_path}: {key} is {value!r}, the preset's FLUX has {expected!r}")
    return base.resolve()


# --------------------------------------------------------------------------------------- codec and text


def describe_codec(spec: str, shift: float | None = None) -> dict:
    """The weights config's codec entry (what serving passes to ``load_codec``), the codec loaded to check it."""
    from modeling.codecs import load_codec

    codec = load_codec(spec if shift is None else {"spec": spec, "shift": shift})
    entry = codec.describe()
    if shift is not None:
        entry["shift"] = float(shift)  # explicit even for a codec without one: the model was trained unshifted
    return entry


def _text_config(path: Path) -> dict:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{path}: no config.json; expected a local Hugging Face text model folder")
    config = json.loads(config_path.read_text())
    return config.get("text_config", config)  # a whole CLIPModel folder nests the text tower's config


def describe_text_encoder(spec: str) -> dict:
    """The weights config's text entry for a ``load_text_encoder`` spec, from config.json files only.

    The FLUX pair (T5-XXL) is tens of GB: reading its config is enough to name it and check its widths.
    """
    if spec == "minilm":
        from modeling.text_encoders import load_text_encoder

        return {**load_text_encoder("minilm").describe(), "spec": "minilm"}
    if spec.startswith("flux:"):
        parts = spec[len("flux:") :].split(",")
        if len(parts) != 2:
            raise ValueError(f"--text {spec!r}: expected flux:T5PATH,CLIPPATH")
        t5, clip = (Path(p) for p in parts)
        return {
            "name": f"flux:{t5.name},{clip.name}",
            "spec": f"flux:{t5.resolve()},{clip.resolve()}",
            "seq_dim": int(_text_config(t5)["d_model"]),
            "pooled_dim": int(_text_config(clip)["hidden_size"]),
            "max_tokens": 512,
        }
    path = Path(spec)
    config = _text_config(path)
    return {
        "name": f"clip:{path.name}",
        "spec": str(path.resolve()),
        "seq_dim": int(config["hidden_size"]),
        "pooled_dim": int(config["hidden_size"]),
        "max_tokens": int(config["max_position_embeddings"]),
    }


def _check_widths(what: str, spec: str, found: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if found != expected:
        raise ValueError(f"{what} {spec}: widths {found} do not fit the model, which needs {expected}")


def _check_size(size: int, multiple: int) -> None:
    if size <= 0 or size % multiple:
        raise ValueError(f"--size {size}: must be a positive multiple of {multiple} (codec downsampling x patch)")


# -------------------------------------------------------------------------------------------- entry points


def _write_weights(weights_dir: Path, state: dict[str, Tensor], config: dict, overwrite: bool) -> Path:
    from modeling.weights import CONFIG_FILE, save_weights

    if (weights_dir / CONFIG_FILE).exists() and not overwrite:
        raise FileExistsError(f"{weights_dir}: already holds weights; pass --overwrite to replace them")
    # float32 on disk, as the trainer writes its checkpoints
    return save_weights(weights_dir, {k: v.float().contiguous() for k, v in state.items()}, config)


def import_mmface_dit(
    weights_path: str | Path,
    weights_dir: str | Path,
    *,
    preset: str = "mmface-dit-xl",
    objective: str = "rfm",
    vae: str = "/models/FLUX.1-dev/vae",
    text: str = "/models/stable-diffusion-2-1/text_encoder",
    size: int = 256,
    overwrite: bool = False,
) -> dict:
    """Convert a released MMFace-DiT ``.safetensors`` into the weights folder ``weights_dir``; returns a summary."""
    weights_path = Path(weights_path)
    cfg = mmface_dit_import_config(preset, objective)
    official, _ = read_safetensors(weights_path)
    state = mmface_dit_from_official(official, cfg, source=str(weights_path))
    codec = describe_codec(vae, shift=0.0)
    text_entry = describe_text_encoder(text)
    _check_widths("codec", vae, (codec["latent_channels"],), (cfg.latent_channels,))
    _check_widths(
        "text encoder", text, (text_entry["seq_dim"], text_entry["pooled_dim"]), (cfg.text_dim, cfg.pooled_dim)
    )
    _check_size(size, codec["downsample"] * cfg.patch_size)
    config = {
        "arch": "mmface-dit",
        "preset": preset,
        "model": cfg.to_dict(),
        "objective": objective,
        "min_snr_gamma": None,
        "codec": codec,
        "text_encoder": text_entry,
        "size": size,
        "imported_from": {"format": "MMFace-DiT public code", "weights": str(weights_path.resolve())},
    }
    out = _write_weights(Path(weights_dir), state, config, overwrite)
    return {"arch": "mmface-dit", "weights": str(out), "tensors": len(state), "params": _count(state)}


def import_face_mogle(
    lora_path: str | Path,
    mogle_path: str | Path,
    base: str | Path,
    weights_dir: str | Path,
    *,
    adapter_path: str | Path | None = None,
    preset: str = "face-mogle-flux-dev",
    vae: str | None = None,
    text: str | None = None,
    size: int = 512,
    overwrite: bool = False,
) -> dict:
    """Convert the released Face-MoGLE LoRA + MoGLE into the weights folder ``weights_dir`` (and, when
    ``adapter_path`` is given, a ``save_adapter`` file beside it); the base stays at ``base``."""
    from modeling.face_mogle import FaceMoGLE, save_adapter

    lora_path, mogle_path, base = Path(lora_path), Path(mogle_path), Path(base)
    cfg = face_mogle_import_config(preset)
    base = check_flux_base(base, cfg.flux)
    vae = vae or str(base / "vae")
    text = text or f"flux:{base / 'text_encoder_2'},{base / 'text_encoder'}"

    lora_official, lora_metadata = read_safetensors(lora_path)
    check_lora_header(lora_metadata, cfg.lora_rank, cfg.lora_alpha, str(lora_path))
    with torch.device("meta"):
        model = FaceMoGLE(cfg)  # names and shapes of the trainable tensors, no memory
    trainable = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    lora_shapes = {n: s for n, s in trainable.items() if n.startswith("transformer.")}
    state = {
        **lora_from_official(lora_official, lora_shapes, source=str(lora_path)),
        **{
            f"mogle.{k}": v
            for k, v in mogle_from_official(read_torch_state_dict(mogle_path), cfg.mogle, str(mogle_path)).items()
        },
    }
    if set(state) != set(trainable):
        raise RuntimeError(f"converted {sorted(set(state) ^ set(trainable))[:5]} do not match the trainable set")

    codec = describe_codec(vae)
    text_entry = describe_text_encoder(text)
    flux = cfg.flux
    _check_widths("codec", vae, (codec["latent_channels"],), (cfg.latent_channels,))
    _check_widths(
        "text encoder",
        text,
        (text_entry["seq_dim"], text_entry["pooled_dim"]),
        (flux.joint_attention_dim, flux.pooled_projection_dim),
    )
    _check_size(size, codec["downsample"] * 2)
    config = {
        "arch": "face-mogle",
        "preset": preset,
        "model": cfg.to_dict(),
        "base_from": str(base),
        "codec": codec,
        "text_encoder": text_entry,
        "size": size,
        "imported_from": {
            "format": "Face-MoGLE public code",
            "lora": str(lora_path.resolve()),
            "mogle": str(mogle_path.resolve()),
        },
    }
    out = _write_weights(Path(weights_dir), state, config, overwrite)
    summary = {"arch": "face-mogle", "weights": str(out), "tensors": len(state), "params": _count(state)}
    if adapter_path is not None:
        # the same tensors in save_adapter's format: configs in the header, diffusers' LoRA names
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False, assign=True)
        save_adapter(model, adapter_path)
        summary["adapter"] = str(Path(adapter_path))
    return summary


def _count(state: Mapping[str, Tensor]) -> int:
    return sum(v.numel() for v in state.values())
