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
