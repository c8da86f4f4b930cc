"""Codecs: the embedded pixel codec is lossless; the AutoencoderKL loader applies (z - shift) * scale."""

import json

import pytest
import torch

from modeling.codecs import PixelUnshuffleCodec, VAECodec, load_codec


def test_pixel_codec_is_lossless_on_8bit_images():
    codec = load_codec("pixel")
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    images = pixels.float() / 127.5 - 1
    latents = codec.encode(images)
    assert latents.shape == (2, 48, 8, 8) == (2, *codec.latent_shape(32))
    # stored as float16 in the shards: the round trip must still give the exact bytes back
    decoded = codec.decode(latents.half().float())
    assert torch.equal(((decoded + 1) * 127.5).round().to(torch.uint8), pixels)


def test_pixel_codec_factor_and_bad_size():
    codec = load_codec("pixel:2")
    assert isinstance(codec, PixelUnshuffleCodec) and codec.latent_channels == 12
    with pytest.raises(ValueError, match="multiple"):
        codec.latent_shape(33)


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    path = tmp_path_factory.mktemp("vae")
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=32,
        scaling_factor=0.5,
        shift_factor=0.25,
    )
    vae.save_pretrained(path)
    return path


def test_vae_codec_loads_local_folder_and_normalises(tiny_vae_dir):
    codec = load_codec(str(tiny_vae_dir))
    assert isinstance(codec, VAECodec)
    assert (codec.latent_channels, codec.downsample, codec.scale, codec.shift) == (4, 2, 0.5, 0.25)
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    latents = codec.encode(images)
    raw = codec.vae.encode(images).latent_dist.mode()
    assert torch.allclose(latents, (raw - 0.25) * 0.5)
    assert codec.decode(latents).shape == images.shape


def test_vae_codec_names_the_missing_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("not a vae")
    with pytest.raises(FileNotFoundError, match="AutoencoderKL"):
        load_codec(str(tmp_path))
    assert json.dumps(load_codec("pixel").describe())


def test_a_codec_entry_can_override_the_vae_shift(tiny_vae_dir):
    own = load_codec(str(tiny_vae_dir))
    unshifted = load_codec({"name": "vae:x", "spec": str(tiny_vae_dir), "shift": 0.0})
    assert (unshifted.shift, unshifted.scale) == (0.0, 0.5) and unshifted.describe()["shift"] == 0.0
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.allclose(unshifted.encode(images), own.encode(images) + 0.25 * 0.5, atol=1e-6)
    # an entry without "shift" (what the trainer wrote for the pixel codec) keeps the VAE's own
    assert load_codec({"name": "vae:x", "spec": str(tiny_vae_dir)}).shift == 0.25
    with pytest.raises(ValueError, match="no latent shift"):
        load_codec({"name": "pixel", "spec": "pixel", "shift": 0.1})
