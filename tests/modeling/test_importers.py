"""Importers: the papers' released checkpoints, written here in their public layouts at tiny size, become faceforge
weights folders that compute what the public code computes, serve, and initialise training.

The "official" files are built from the public code's key names and shapes, and each is checked against a small
reference forward written here from the public code's semantics (interleaved RoPE pairs, null caption in input
space, 999 * t, diffusers' timestep features for the gate) that uses none of our model code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from modeling.face_mogle import PRESETS as MOGLE_PRESETS
from modeling.importers import (
    face_mogle_import_config,
    import_face_mogle,
    import_mmface_dit,
    rope_row_permutation,
)
from modeling.mmface_dit import PRESETS as DIT_PRESETS
from modeling.mmface_dit import MMFaceDiTConfig, build
from modeling.rope import apply_rope, rope_cos_sin
from modeling.weights import load_into, load_weights

DIT = DIT_PRESETS["mmface-dit-tiny"]
SIZE = 32  # pixels: the pixel:2 codec makes a 16x16 latent, an 8x8 grid of image tokens
FLUX_TINY = MOGLE_PRESETS["face-mogle-tiny"]
# the public Face-MoGLE training config's LoRA targets (config/Face-MoGLE.yaml, lora_config.target_modules)
OFFICIAL_LORA_TARGETS = (
    r"(.*x_embedder|.*(?<!single_)transformer_blocks\.[0-9]+\.norm1\.linear"
    r"|.*(?<!single_)transformer_blocks\.[0-9]+\.attn\.to_k|.*(?<!single_)transformer_blocks\.[0-9]+\.attn\.to_q"
    r"|.*(?<!single_)transformer_blocks\.[0-9]+\.attn\.to_v|.*(?<!single_)transformer_blocks\.[0-9]+\.attn\.to_out\.0"
    r"|.*(?<!single_)transformer_blocks\.[0-9]+\.ff\.net\.2|.*single_transformer_blocks\.[0-9]+\.norm\.linear"
    r"|.*single_transformer_blocks\.[0-9]+\.proj_mlp|.*single_transformer_blocks\.[0-9]+\.proj_out"
    r"|.*single_transformer_blocks\.[0-9]+\.attn.to_k|.*single_transformer_blocks\.[0-9]+\.attn.to_q"
    r"|.*single_transformer_blocks\.[0-9]+\.attn.to_v|.*single_transformer_blocks\.[0-9]+\.attn.to_out)"
)


def _random(shape: tuple[int, ...], g: torch.Generator, bias: bool = False) -> torch.Tensor:
    # modest weights keep activations O(1) through the blocks, so a 1e-5 comparison means something
    scale = 0.05 if bias else 0.6 / math.sqrt(math.prod(shape[1:]) or 1)
    return torch.randn(shape, generator=g) * scale


# ------------------------------------------------------------------------------- MMFace-DiT, public layout


def official_mmface_shapes(cfg: MMFaceDiTConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the public ``UnifiedDualStreamDiT.state_dict()`` (in_channels = 2 x latent channels)."""
    h, c, p = cfg.hidden_size, cfg.latent_channels, cfg.patch_size
    mlp = int(h * cfg.mlp_ratio)
    shapes = {
        "x_embedder.proj.weight": (h, 2 * c, p, p),
        "x_embedder.proj.bias": (h,),
        "t_embedder.mlp.0.weight": (h, cfg.frequency_embedding_size),
        "t_embedder.mlp.0.bias": (h,),
        "t_embedder.mlp.2.weight": (h, h),
        "t_embedder.mlp.2.bias": (h,),
        "c_embedder.proj.weight": (h, cfg.pooled_dim),
        "c_embedder.proj.bias": (h,),
        "c_embedder.null_feature_pooled": (cfg.pooled_dim,),
        "clip_seq_proj.weight": (h, cfg.text_dim),
        "clip_seq_proj.bias": (h,),
        "modality_embedder.weight": (2, h),
        "final_layer.linear.weight": (p * p * c, h),
        "final_layer.linear.bias": (p * p * c,),
        "final_layer.adaLN_modulation.1.weight": (2 * h, h),
        "final_layer.adaLN_modulation.1.bias": (2 * h,),
    }
    for i in range(cfg.depth):
        b = f"blocks.{i}"
        for name in ("to_q", "to_k", "to_v", "to_out", "to_q_t", "to_k_t", "to_v_t", "to_out_t"):
            shapes[f"{b}.attn.{name}.weight"] = (h, h)
        for stream in ("mlp_i", "mlp_t"):
            shapes |= {
                f"{b}.{stream}.0.weight": (mlp, h),
                f"{b}.{stream}.0.bias": (mlp,),
                f"{b}.{stream}.2.weight": (h, mlp),
                f"{b}.{stream}.2.bias": (h,),
            }
        shapes |= {f"{b}.adaLN_modulation.1.weight": (12 * h, h), f"{b}.adaLN_modulation.1.bias": (12 * h,)}
    return shapes


def official_mmface_state(cfg: MMFaceDiTConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {k: _random(s, g, bias=len(s) == 1) for k, s in official_mmface_shapes(cfg).items()}
    state["c_embedder.null_feature_pooled"] = torch.randn(cfg.pooled_dim, generator=g)
    return state


def _lin(sd: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))


def _interleaved_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """FLUX-style RoPE: channels (2i, 2i+1) rotated by angle i. x (B, S, heads, D), angles (S, D/2)."""
    pairs = x.unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


def public_mmface_forward(sd, cfg, x, cond, t, pooled, text, modality, flow: bool, drop=None) -> torch.Tensor:
    """The public code's forward (eval mode), written from its semantics, in the dtype of ``sd``."""
    h, heads, p, c = cfg.hidden_size, cfg.num_heads, cfg.patch_size, cfg.latent_channels
    hd = h // heads
    img = F.conv2d(torch.cat([x, cond], 1), sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
    gh, gw = img.shape[-2:]
    img = img.flatten(2).transpose(1, 2)
    t_in = t * 999.0 if flow else t  # its flow model rescales t in [0, 1] to [0, 999]
    half = cfg.frequency_embedding_size // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t_in.float()[:, None] * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], -1).to(img.dtype)
    t_emb = _lin(sd, "t_embedder.mlp.2", F.silu(_lin(sd, "t_embedder.mlp.0", t_freq)))
    if drop is not None:  # its dropped caption: the learned null *input* feature, then the projection
        pooled = torch.where(drop[:, None], sd["c_embedder.null_feature_pooled"], pooled)
    c_global = _lin(sd, "c_embedder.proj", pooled) + t_emb + sd["modality_embedder.weight"][modality]
    txt = _lin(sd, "clip_seq_proj", text)
    # 2-D ids (row, col) for image tokens, all-zero ids for text; per axis hd/2 channels, frequencies 10000^(-2i/axis)
    axis = hd // 2
    omega = 1.0 / 10000 ** (torch.arange(0, axis, 2, dtype=torch.float64) / axis)
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    img_angles = torch.cat([rows.reshape(-1, 1) * omega, cols.reshape(-1, 1) * omega], dim=-1)
    angles = torch.cat([img_angles, torch.zeros(txt.shape[1], hd // 2, dtype=torch.float64)]).to(img.dtype)

    def ln(v):
        return F.layer_norm(v, (h,), eps=1e-6)

    def mod(v, shift, scale):
        return v * (1 + scale[:, None]) + shift[:, None]

    def mlp(name, v):
        return _lin(sd, f"{name}.2", F.gelu(_lin(sd, f"{name}.0", v), approximate="tanh"))

    b, n = img.shape[:2]
    for i in range(cfg.depth):
        blk = f"blocks.{i}"
        ms = _lin(sd, f"{blk}.adaLN_modulation.1", F.silu(c_global)).chunk(12, dim=1)
        mi, mt = mod(ln(img), ms[0], ms[1]), mod(ln(txt), ms[6], ms[7])
        q = torch.cat([_lin(sd, f"{blk}.attn.to_q", mi), _lin(sd, f"{blk}.attn.to_q_t", mt)], 1)
        k = torch.cat([_lin(sd, f"{blk}.attn.to_k", mi), _lin(sd, f"{blk}.attn.to_k_t", mt)], 1)
        v = torch.cat([_lin(sd, f"{blk}.attn.to_v", mi), _lin(sd, f"{blk}.attn.to_v_t", mt)], 1)
        q, k, v = (z.view(b, -1, heads, hd) for z in (q, k, v))
        q, k = _interleaved_rope(q, angles), _interleaved_rope(k, angles)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out.transpose(1, 2).flatten(2)
        img = img + ms[2][:, None] * _lin(sd, f"{blk}.attn.to_out", out[:, :n])
        txt = txt + ms[8][:, None] * _lin(sd, f"{blk}.attn.to_out_t", out[:, n:])
        img = img + ms[5][:, None] * mlp(f"{blk}.mlp_i", mod(ln(img), ms[3], ms[4]))
        txt = txt + ms[11][:, None] * mlp(f"{blk}.mlp_t", mod(ln(txt), ms[9], ms[10]))
    shift, scale = _lin(sd, "final_layer.adaLN_modulation.1", F.silu(c_global)).chunk(2, dim=1)
    out = _lin(sd, "final_layer.linear", mod(ln(img), shift, scale))
    out = out.reshape(b, gh, gw, p, p, c)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(b, c, gh * p, gw * p)


def _dit_inputs(cfg: MMFaceDiTConfig, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    latent = SIZE // 4
    return {
        "x": torch.randn(2, cfg.latent_channels, latent, latent, generator=g, dtype=torch.float64),
        "cond": torch.randn(2, cfg.latent_channels, latent, latent, generator=g, dtype=torch.float64),
        "text": torch.randn(2, 5, cfg.text_dim, generator=g, dtype=torch.float64),
        "pooled": torch.randn(2, cfg.pooled_dim, generator=g, dtype=torch.float64),
        "modality": torch.tensor([0, 1]),
    }


def _import_dit(tmp_path: Path, state: dict, objective: str = "rfm") -> Path:
    path = tmp_path / "dit_model_weights_ema.safetensors"
    save_file(state, str(path))
    out = tmp_path / "imported" / "weights"
    import_mmface_dit(path, out, preset="mmface-dit-tiny", objective=objective, vae="pixel:2", text="minilm", size=SIZE)
    return out


def _load_dit(weights: Path) -> torch.nn.Module:
    state, config = load_weights(weights)
    model = build(MMFaceDiTConfig.from_dict(config["model"]))
    load_into(model, state)
    return model.double().eval()


@pytest.fixture(scope="module")
def official_dit() -> dict[str, torch.Tensor]:
    return official_mmface_state(DIT)


def test_rope_row_permutation_turns_interleaved_pairs_into_rotate_half():
    g = torch.Generator().manual_seed(0)
    head_dim, n = 32, 6
    x = torch.randn(n, head_dim, generator=g, dtype=torch.float64)
    angles = torch.rand(n, head_dim // 2, generator=g, dtype=torch.float64) * 10
    perm = rope_row_permutation(head_dim)
    official = _interleaved_rope(x[:, None], angles)[:, 0]
    cos, sin = rope_cos_sin(angles, torch.float64)
    # channel by channel: rotating the permuted vector our way == permuting the vector rotated their way
    torch.testing.assert_close(apply_rope(x[:, perm], cos, sin), official[:, perm], rtol=0, atol=1e-12)
    assert perm.tolist()[:3] == [0, 2, 4] and perm.tolist()[head_dim // 2 : head_dim // 2 + 2] == [1, 3]


@pytest.mark.parametrize("objective", ["rfm", "ddpm"])
def test_imported_mmface_dit_computes_the_public_forward(tmp_path, official_dit, objective):
    model = _load_dit(_import_dit(tmp_path, official_dit, objective))
    sd = {k: v.double() for k, v in official_dit.items()}
    inputs = _dit_inputs(DIT)
    flow = objective == "rfm"
    # dyadic flow times: 1000 t * 0.999 and 999 t are the same float32, so the check is exact up to round-off
    t = torch.tensor([0.25, 0.75]) if flow else torch.tensor([250.0, 731.0])
    drop = torch.tensor([False, True])
    with torch.no_grad():
        ours = model(
            inputs["x"], inputs["cond"], t * 1000 if flow else t, inputs["text"], inputs["pooled"],
            inputs["modality"], drop_caption=drop,
        )  # fmt: skip
        reference = public_mmface_forward(
            sd, DIT, inputs["x"], inputs["cond"], t, inputs["pooled"], inputs["text"], inputs["modality"], flow, drop
        )
    assert reference.abs().mean() > 0.1  # a real signal, not a zero output that would match anything
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


def test_without_the_rope_row_permutation_the_forward_differs(tmp_path, official_dit):
    weights = _import_dit(tmp_path, official_dit)
    model = _load_dit(weights)
    h = DIT.hidden_size
    with torch.no_grad():  # put the official (interleaved) row order back into block 0's image q
        model.blocks[0].img_qkv.weight[:h] = official_dit["blocks.0.attn.to_q.weight"].double()
        inputs = _dit_inputs(DIT)
        t = torch.tensor([0.25, 0.75])
        ours = model(inputs["x"], inputs["cond"], t * 1000, inputs["text"], inputs["pooled"], inputs["modality"])
        reference = public_mmface_forward(
            {k: v.double() for k, v in official_dit.items()}, DIT, inputs["x"], inputs["cond"], t,
            inputs["pooled"], inputs["text"], inputs["modality"], flow=True,
        )  # fmt: skip
    assert (ours - reference).abs().max() > 1e-3


def test_imported_mmface_config_keeps_the_public_codes_behaviour(tmp_path, official_dit):
    weights = _import_dit(tmp_path, official_dit)
    state, config = load_weights(weights)
    assert sorted(p.name for p in weights.iterdir()) == ["config.json", "model.safetensors"]
    assert (config["arch"], config["preset"], config["objective"], config["size"]) == (
        "mmface-dit", "mmface-dit-tiny", "rfm", SIZE,
    )  # fmt: skip
    assert config["model"]["text_rope"] is False and config["model"]["timestep_scale"] == 0.999
    assert config["codec"]["spec"] == "pixel:2" and config["codec"]["shift"] == 0.0
    assert config["text_encoder"]["spec"] == "minilm"
    null = official_dit["c_embedder.proj.weight"].double() @ official_dit["c_embedder.null_feature_pooled"].double()
    null += official_dit["c_embedder.proj.bias"].double()
    torch.testing.assert_close(state["caption_embedder.null"].double(), null, rtol=0, atol=1e-6)
    assert all(v.dtype == torch.float32 for v in state.values())


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        ("drop", "blocks.1.attn.to_k_t.weight"),
        ("drop", "c_embedder.null_feature_pooled"),
        ("add", "blocks.0.attn.norm_q.weight"),
        ("add", "blocks.4.attn.to_q.weight"),  # a deeper checkpoint than the preset
        ("reshape", "final_layer.linear.weight"),
    ],
)
def test_a_missing_extra_or_misshapen_official_key_is_named(tmp_path, official_dit, edit, key):
    state = dict(official_dit)
    if edit == "drop":
        del state[key]
    elif edit == "add":
        state[key] = torch.zeros(DIT.hidden_size, DIT.hidden_size)
    else:
        state[key] = state[key][:-1]
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as info:
        _import_dit(tmp_path, state)
    assert "dit_model_weights_ema.safetensors" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "imported" / "weights").exists()


def test_truncated_or_foreign_weights_files_are_one_line_errors_naming_the_file(tmp_path, official_dit):
    good = tmp_path / "good.safetensors"
    save_file(official_dit, str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    foreign = tmp_path / "notes.safetensors"
    foreign.write_text("these are not the weights you are looking for")
    for path in (truncated, foreign):
        with pytest.raises(ValueError, match=path.name) as info:
            import_mmface_dit(path, tmp_path / "out", preset="mmface-dit-tiny", vae="pixel:2", text="minilm")
        assert "\n" not in str(info.value)


def test_codec_and_text_encoder_must_fit_the_model(tmp_path, official_dit):
    path = tmp_path / "w.safetensors"
    save_file(official_dit, str(path))
    with pytest.raises(ValueError, match="codec pixel:4"):
        import_mmface_dit(path, tmp_path / "out", preset="mmface-dit-tiny", vae="pixel:4", text="minilm")
    with pytest.raises(FileNotFoundError, match="config.json"):
        import_mmface_dit(path, tmp_path / "out", preset="mmface-dit-tiny", vae="pixel:2", text=str(tmp_path))


def test_imported_mmface_dit_serves_and_initialises_training(tmp_path, official_dit):
    from modeling.generator import FaceGenerator, GenerationRequest
    from pipelines.train.loop import load_initial_weights

    weights = _import_dit(tmp_path, official_dit)
    generator = FaceGenerator(weights.parent)
    assert generator.describe()["arch"] == "mmface-dit"
    (image,) = generator.generate([GenerationRequest(prompt="a smiling woman", seed=3)], steps=2)
    assert image.shape == (SIZE, SIZE, 3) and image.dtype.name == "uint8"

    _, config = load_weights(weights)
    fresh = build(MMFaceDiTConfig.from_dict(config["model"]))
    load_initial_weights(fresh, str(weights.parent))
    for name, value in load_file(str(weights / "model.safetensors")).items():
        torch.testing.assert_close(fresh.state_dict()[name], value, msg=name)


def test_cli_imports_and_reports_bad_input_in_one_line(tmp_path, official_dit, capsys):
    from pipelines.cli import main

    path = tmp_path / "dit_model_weights_ema.safetensors"
    save_file(official_dit, str(path))
    out = tmp_path / "cli"
    argv = ["import", "mmface-dit", str(path), "--out", str(out), "--preset", "mmface-dit-tiny"]
    argv += ["--vae", "pixel:2", "--text", "minilm", "--size", str(SIZE)]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["weights"] == str(out / "weights") and (out / "weights" / "model.safetensors").is_file()

    assert main(argv) == 2  # the folder now holds weights
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    capsys.readouterr()

    path.write_bytes(path.read_bytes()[:1000])
    assert main([*argv, "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("faceforge: error:") and str(path) in err and "\n" not in err


# -------------------------------------------------------------------------------- Face-MoGLE, public layout


def official_mogle_state(token_dim: int, hidden: int, time_dim: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """The public ``MoGLE().state_dict()`` at other widths (its gate: Timesteps(time_dim) -> TimestepEmbedding)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {}
    for expert in ["global_expert"] + [f"local_experts.{i}" for i in range(19)]:
        shapes |= {
            f"{expert}.net.0.weight": (hidden, token_dim),
            f"{expert}.net.0.bias": (hidden,),
            f"{expert}.net.2.weight": (token_dim, hidden),
            f"{expert}.net.2.bias": (token_dim,),
        }
    shapes |= {
        "gating.timestep_embedding.linear_1.weight": (token_dim, time_dim),
        "gating.timestep_embedding.linear_1.bias": (token_dim,),
        "gating.timestep_embedding.linear_2.weight": (token_dim, token_dim),
        "gating.timestep_embedding.linear_2.bias": (token_dim,),
        "gating.noise_proj.weight": (token_dim, token_dim),
        "gating.noise_proj.bias": (token_dim,),
        "gating.gate.0.weight": (token_dim, token_dim),
        "gating.gate.0.bias": (token_dim,),
        "gating.gate.2.weight": (20, token_dim),
        "gating.gate.2.bias": (20,),
    }
    return {k: torch.randn(s, generator=g) * (0.3 if len(s) == 1 else 1 / math.sqrt(s[1])) for k, s in shapes.items()}


def public_mogle_forward(sd, cond, noisy, t) -> torch.Tensor:
    """The public MoGLE forward (experts + dynamic gate); the gate's time features as diffusers' Timesteps."""
    from diffusers.models.embeddings import get_timestep_embedding

    temb = get_timestep_embedding(t, 64, flip_sin_to_cos=True, downscale_freq_shift=0)
    temb = _lin(sd, "gating.timestep_embedding.linear_2", F.silu(_lin(sd, "gating.timestep_embedding.linear_1", temb)))
    fused = cond[:, 0] + _lin(sd, "gating.noise_proj", noisy) + temb[:, None]
    weights = _lin(sd, "gating.gate.2", F.relu(_lin(sd, "gating.gate.0", fused))).softmax(dim=2)
    experts = ["global_expert"] + [f"local_experts.{i}" for i in range(19)]
    outs = torch.stack(
        [_lin(sd, f"{e}.net.2", F.relu(_lin(sd, f"{e}.net.0", cond[:, j]))) for j, e in enumerate(experts)], dim=1
    )
    return (outs.permute(0, 2, 1, 3) * weights.unsqueeze(-1)).sum(dim=2)


@pytest.fixture(scope="module")
def mogle_release(tmp_path_factory):
    """A tiny FLUX base folder, and the release's two files made by the public code's own save calls."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig, get_peft_model_state_dict

    root = tmp_path_factory.mktemp("mogle_release")
    torch.manual_seed(0)
    FluxTransformer2DModel(**FLUX_TINY.flux.kwargs()).save_pretrained(root / "base" / "transformer")
    trained = FluxTransformer2DModel(**FLUX_TINY.flux.kwargs())
    trained.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=OFFICIAL_LORA_TARGETS)
    )
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if ".lora_" in name:
                p.normal_()
    FluxPipeline.save_lora_weights(
        save_directory=str(root / "run"),
        transformer_lora_layers=get_peft_model_state_dict(trained),
        safe_serialization=True,
    )
    mogle = official_mogle_state(FLUX_TINY.mogle.token_dim, FLUX_TINY.mogle.hidden)
    torch.save(mogle, root / "run" / "global_local_mask_moe.pt")
    lora = {n: p.detach().clone() for n, p in trained.named_parameters() if ".lora_" in n}
    return {
        "base": root / "base",
        "lora": root / "run" / "pytorch_lora_weights.safetensors",
        "mogle": root / "run" / "global_local_mask_moe.pt",
        "lora_params": lora,
        "mogle_state": mogle,
    }


@pytest.fixture(scope="module")
def imported_mogle(mogle_release, tmp_path_factory) -> Path:
    from pipelines.cli import main

    out = tmp_path_factory.mktemp("imported_mogle")
    argv = ["import", "face-mogle", "--lora", str(mogle_release["lora"]), "--mogle", str(mogle_release["mogle"])]
    argv += ["--base", str(mogle_release["base"]), "--out", str(out), "--preset", "face-mogle-tiny"]
    argv += ["--vae", "pixel:2", "--text", "minilm", "--size", str(SIZE)]
    assert main(argv) == 0
    return out


def _mogle_model(imported: Path):
    from modeling.face_mogle import FaceMoGLEConfig, build_face_mogle, load_trainable

    state, config = load_weights(imported / "weights")
    model = build_face_mogle(FaceMoGLEConfig.from_dict(config["model"]), config["base_from"])
    load_trainable(model, state)
    return model.eval(), state, config


def test_imported_mogle_computes_the_public_mixture(imported_mogle, mogle_release):
    model, _, config = _mogle_model(imported_mogle)
    assert config["model"]["mode"] == "lora" and config["model"]["mogle"]["time_scale"] == 1.0
    g = torch.Generator().manual_seed(5)
    d = FLUX_TINY.mogle.token_dim
    cond, noisy = torch.randn(2, 20, 16, d, generator=g), torch.randn(2, 16, d, generator=g)
    t = torch.tensor([0.3, 0.9])  # flow time in [0, 1], as the public training fed its gate
    with torch.no_grad():
        ours = model.mogle(cond, noisy, t)
        reference = public_mogle_forward(mogle_release["mogle_state"], cond, noisy, t)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


def test_imported_lora_sits_on_the_modules_it_was_trained_on(imported_mogle, mogle_release):
    model, state, config = _mogle_model(imported_mogle)
    params = dict(model.transformer.named_parameters())
    trained = mogle_release["lora_params"]
    assert len(trained) == sum(".lora_" in k for k in state)
    for name, value in trained.items():  # peft names: <module>.lora_A.default.weight, in the model that trained them
        torch.testing.assert_close(params[name], value, rtol=0, atol=0, msg=name)
    assert config["base_from"] == str(mogle_release["base"].resolve())
    assert not any(k.startswith("transformer.") and ".lora_" not in k for k in state)  # no base weights


def test_imported_mogle_serves_initialises_training_and_writes_an_adapter(imported_mogle, mogle_release):
    from diffusers import FluxTransformer2DModel

    from modeling.face_mogle import FaceMoGLE, build_face_mogle, load_adapter, read_adapter_config
    from modeling.generator import FaceGenerator, GenerationRequest
    from pipelines.train.loop import load_initial_weights

    generator = FaceGenerator(imported_mogle)
    (image,) = generator.generate([GenerationRequest(prompt="a man with a beard", seed=1)], steps=2)
    assert image.shape == (SIZE, SIZE, 3)

    state, config = load_weights(imported_mogle / "weights")
    cfg = face_mogle_import_config("face-mogle-tiny")
    fresh = build_face_mogle(cfg, config["base_from"])
    load_initial_weights(fresh, str(imported_mogle))
    params = dict(fresh.named_parameters())
    for name, value in state.items():
        torch.testing.assert_close(params[name], value, msg=name)

    adapter = imported_mogle / "adapter.safetensors"
    assert read_adapter_config(adapter) == cfg
    other = FaceMoGLE(cfg, transformer=FluxTransformer2DModel(**cfg.flux.kwargs()))
    load_adapter(other, adapter)
    torch.testing.assert_close(other.mogle.experts.w1, state["mogle.experts.w1"])


def _import_mogle(tmp_path: Path, release: dict, lora: Path | None = None, mogle: Path | None = None) -> dict:
    return import_face_mogle(
        lora or release["lora"], mogle or release["mogle"], release["base"], tmp_path / "weights",
        preset="face-mogle-tiny", vae="pixel:2", text="minilm", size=SIZE,
    )  # fmt: skip


def test_mogle_experts_are_restacked_transposed(tmp_path, mogle_release):
    _import_mogle(tmp_path, mogle_release)
    state, _ = load_weights(tmp_path / "weights")
    official = mogle_release["mogle_state"]
    torch.testing.assert_close(state["mogle.experts.w1"][0], official["global_expert.net.0.weight"].T)
    torch.testing.assert_close(state["mogle.experts.w2"][19], official["local_experts.18.net.2.weight"].T)
    torch.testing.assert_close(state["mogle.experts.b1"][1], official["local_experts.0.net.0.bias"])
    torch.testing.assert_close(state["mogle.gate.latent_proj.weight"], official["gating.noise_proj.weight"])


@pytest.mark.parametrize(
    ("which", "edit", "key"),
    [
        ("mogle", "drop", "local_experts.18.net.2.bias"),
        ("mogle", "add", "gating.time_proj.weight"),
        ("lora", "drop", "transformer.single_transformer_blocks.1.proj_out.lora_B.weight"),
        ("lora", "add", "transformer.context_embedder.lora_A.weight"),
    ],
)
def test_a_missing_or_extra_release_key_is_named(tmp_path, mogle_release, which, edit, key):
    if which == "mogle":
        state = dict(mogle_release["mogle_state"])
        path = tmp_path / "mogle.pt"
    else:
        state = load_file(str(mogle_release["lora"]))
        path = tmp_path / "lora.safetensors"
    if edit == "drop":
        del state[key]
    else:
        state[key] = torch.zeros(4, 4)
    torch.save(state, path) if which == "mogle" else save_file(state, str(path))
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as info:
        _import_mogle(tmp_path, mogle_release, **{which: path})
    assert path.name in str(info.value)


def test_unreadable_mogle_files_are_one_line_errors_naming_the_file(tmp_path, mogle_release):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(mogle_release["mogle"].read_bytes()[:2000])
    not_a_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], not_a_dict)
    for path in (truncated, not_a_dict, mogle_release["lora"]):
        with pytest.raises(ValueError, match=path.name) as info:
            _import_mogle(tmp_path, mogle_release, mogle=path)
        assert "\n" not in str(info.value)


def test_a_base_of_another_architecture_is_refused(tmp_path, mogle_release):
    base = tmp_path / "other_base"
    (base / "transformer").mkdir(parents=True)
    config = json.loads((mogle_release["base"] / "transformer" / "config.json").read_text())
    (base / "transformer" / "config.json").write_text(json.dumps({**config, "num_layers": 19}))
    with pytest.raises(ValueError, match="num_layers"):
        import_face_mogle(
            mogle_release["lora"], mogle_release["mogle"], base, tmp_path / "w", preset="face-mogle-tiny",
            vae="pixel:2", text="minilm",
        )  # fmt: skip
