"""The face generator's defaults: the sampler settings recorded with the weights, else the paper's."""

from modeling.generator import accepted_inputs, sampler_defaults


def test_sampler_defaults_come_from_the_weights_else_the_papers():
    tiny = {"arch": "mmface-dit"}
    assert sampler_defaults(tiny) == sampler_defaults({**tiny, "sampler": {}})
    paper = sampler_defaults(tiny)
    assert (paper.steps, paper.guidance) == (50, 7.5)  # the MMFace-DiT paper and code sample 50 steps, CFG 7.5
    recorded = sampler_defaults({**tiny, "sampler": {"steps": 12, "guidance": 2.5}})
    assert (recorded.steps, recorded.guidance) == (12, 2.5)
    from modeling.face_mogle import PRESETS

    dev = sampler_defaults({"arch": "face-mogle", "model": PRESETS["face-mogle-flux-dev"].to_dict()})
    assert (dev.steps, dev.guidance) == (28, 3.5)  # FLUX.1-dev: 28 steps, distilled guidance 3.5
    assert accepted_inputs("face-mogle") == {"text": True, "mask": True, "sketch": False}


def test_text_alone_gets_the_text_guidance_and_a_mixed_batch_guides_each_request_as_alone(tmp_path):
    import numpy as np

    from modeling.generator import FaceGenerator, GenerationRequest

    config = _tiny_weights(tmp_path / "weights")
    generator = FaceGenerator(tmp_path / "weights")
    assert (generator.defaults.guidance, generator.defaults.text_guidance) == (2.0, 6.0)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 1
    text = GenerationRequest(prompt="a person with red hair", seed=1)
    masked = GenerationRequest(prompt="a person with red hair", mask=mask, seed=2)
    assert generator.default_guidance(text) == 6.0 and generator.default_guidance(masked) == 2.0
    (text_default,) = generator.generate([text])
    assert np.array_equal(text_default, generator.generate([text], guidance=6.0)[0])
    assert not np.array_equal(text_default, generator.generate([text], guidance=2.0)[0])
    mixed = generator.generate([text, masked])  # one batch, a scale per request
    assert np.abs(mixed[0].astype(int) - text_default).max() <= 1  # batched vs alone: float rounding only
    assert np.abs(mixed[1].astype(int) - generator.generate([masked], guidance=2.0)[0]).max() <= 1
    # a model recorded without a text guidance guides text alone like anything else
    plain = sampler_defaults({**config, "sampler": {"steps": 3, "guidance": 2.0}})
    assert plain.text_guidance is None


def _tiny_weights(folder) -> dict:
    """A tiny MMFace-DiT saved as serving weights (perturbed: zero-initialised layers would ignore the conditions)."""
    import torch

    from modeling.importers import describe_codec, describe_text_encoder
    from modeling.mmface_dit import PRESETS, build
    from modeling.weights import save_weights

    cfg = PRESETS["mmface-dit-tiny"]
    torch.manual_seed(0)
    model = build(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # zero-initialised layers now make the caption and the mask matter
    config = {"arch": "mmface-dit", "preset": "mmface-dit-tiny", "model": cfg.to_dict(), "objective": "rfm",
              "codec": describe_codec("pixel:2", shift=0.0), "text_encoder": describe_text_encoder("minilm"),
              "size": 32, "sampler": {"steps": 3, "guidance": 2.0, "text_guidance": 6.0}}  # fmt: skip
    save_weights(folder, model.state_dict(), config)
    return config


def test_sampling_on_cpu_flushes_denormals_in_the_thread_that_samples(tmp_path):
    """Flush-to-zero is a per-thread state: a server samples in pool threads that existed before its generator was
    built (Serve's replica builds it in one pool thread and samples in others). Sampling sets it where it runs: a
    thread that had it off has it on after one ``generate``, and the image is the one the building thread draws."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import torch

    from modeling.generator import FaceGenerator, GenerationRequest

    def flushes() -> bool:
        return (torch.tensor([1e-39]) * 1.0).item() == 0.0

    def turn_off() -> bool:
        torch.set_flush_denormal(False)
        return flushes()

    _tiny_weights(tmp_path / "weights")
    request = GenerationRequest(prompt="a person with red hair", seed=3)
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(turn_off).result() is False
        generator = FaceGenerator(tmp_path / "weights")  # built on this thread, as Serve builds it on another
        image, flushed = pool.submit(lambda: (generator.generate([request])[0], flushes())).result()
    assert flushed
    assert np.array_equal(image, generator.generate([request])[0])
