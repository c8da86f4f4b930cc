"""The trainer's AdamW8bit: bitsandbytes' optimizer with a chunked CPU update and a nearest-code quantizer."""

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch

from modeling.optim import AdamW8bit, NearestCodeQuantizer


def _edge_and_random_values(signed: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    # heavy-tailed magnitudes: most values are tiny relative to the block maximum, as optimizer states are
    x = torch.randn(1 << 15, generator=g) * torch.rand(1 << 15, generator=g) ** 8
    x = torch.cat([x, torch.tensor([0.0, 1.0, -1.0, 1e-30, -1e-30, 1e-7, 0.5])])
    x = x / x.abs().max()
    return x if signed else x.abs()


@pytest.mark.parametrize("signed", [True, False])
def test_quantizer_rounds_to_the_nearest_code(signed):
    code = bnbF.create_dynamic_map(signed=signed)
    quantizer = NearestCodeQuantizer(code)
    x = _edge_and_random_values(signed)
    nearest = (x[:, None] - code[None]).abs().argmin(dim=1)
    assert torch.equal(quantizer.codes(x).long(), nearest)


def test_quantizer_rejects_an_unsorted_map():
    code = bnbF.create_dynamic_map(signed=True).flip(0)
    with pytest.raises(ValueError, match="increasing"):
        NearestCodeQuantizer(code)


def _run(optimizer_factory, shape, steps=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    param = torch.nn.Parameter(torch.randn(shape, generator=g) * 0.02)
    start = param.detach().clone()
    optimizer = optimizer_factory([param])
    for _ in range(steps):
        param.grad = torch.randn(shape, generator=g)
        optimizer.step()
    return param.detach(), start, optimizer


def test_chunked_update_equals_the_whole_tensor_update():
    # 70_001 elements: many chunks of 1024 and a ragged last quantization block
    shape = (7, 10_001)
    small, _, opt_small = _run(lambda p: AdamW8bit(p, lr=1e-3, chunk_elements=1024), shape)
    whole, _, opt_whole = _run(lambda p: AdamW8bit(p, lr=1e-3, chunk_elements=1 << 20), shape)
    assert torch.equal(small, whole)
    s_small = next(iter(opt_small.state.values()))
    s_whole = next(iter(opt_whole.state.values()))
    for key in ("state1", "state2", "absmax1", "absmax2"):
        assert torch.equal(s_small[key], s_whole[key]), key
    assert s_small["state1"].dtype == torch.uint8


def test_update_follows_fp32_adamw_as_closely_as_bitsandbytes():
    shape = (300, 1030)
    steps = 20
    ours, start, _ = _run(lambda p: AdamW8bit(p, lr=1e-3, weight_decay=0.01, chunk_elements=4096), shape, steps)
    stock, _, _ = _run(lambda p: bnb.optim.AdamW8bit(p, lr=1e-3, weight_decay=0.01), shape, steps)
    exact, _, _ = _run(lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01), shape, steps)
    reference = exact - start

    def rel_err(x: torch.Tensor) -> float:
        return float((x - start - reference).norm() / reference.norm())

    assert rel_err(ours) < 0.05
    assert rel_err(ours) <= 1.1 * rel_err(stock)


def test_state_moves_between_this_optimizer_and_bitsandbytes():
    shape = (64, 1000)
    param, _, ours = _run(lambda p: AdamW8bit(p, lr=1e-3, chunk_elements=4096), shape)
    twin = torch.nn.Parameter(param.clone())
    stock = bnb.optim.AdamW8bit([twin], lr=1e-3)
    stock.load_state_dict(ours.state_dict())
    p_ours = ours.param_groups[0]["params"][0]
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    p_ours.grad, twin.grad = grad.clone(), grad.clone()
    before = param.clone()
    ours.step()
    stock.step()
    assert ours.state[p_ours]["step"] == stock.state[twin]["step"] == 6
    step_ours, step_stock = p_ours.detach() - before, twin.detach() - before
    # the same moments continue: both steps agree up to the quantization of the states
    assert float((step_ours - step_stock).norm() / step_stock.norm()) < 0.05


def test_a_resumed_optimizer_builds_one_table_per_code_map():
    shapes = [(64, 1000), (32, 700), (5000,)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    first = AdamW8bit(params, lr=1e-3, chunk_elements=4096)
    for p in params:
        p.grad = torch.randn_like(p)
    first.step()
    resumed = AdamW8bit(params, lr=1e-3, chunk_elements=4096)
    resumed.load_state_dict(first.state_dict())
    for p in params:  # as from a checkpoint whose tensors were saved one by one: a copy of the maps each
        state = resumed.state[p]
        state["qmap1"], state["qmap2"] = state["qmap1"].clone(), state["qmap2"].clone()
    resumed.step()
    assert len(resumed._quantizers) == 2  # signed (first moment) and unsigned (second moment)


def test_small_tensors_keep_bitsandbytes_32_bit_state():
    param, start, optimizer = _run(lambda p: AdamW8bit(p, lr=1e-3), (100,))
    assert next(iter(optimizer.state.values()))["state1"].dtype == torch.float32
    assert not torch.equal(param, start)


def test_bf16_parameters_update_through_fp32_math():
    g = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter(torch.randn(64, 512, generator=g).bfloat16())
    start = param.detach().clone()
    optimizer = AdamW8bit([param], lr=1e-2, chunk_elements=4096)
    param.grad = torch.ones_like(param)
    optimizer.step()
    assert param.dtype == torch.bfloat16
    # first Adam step moves every weight by about -lr (m / sqrt(v) = 1)
    assert torch.allclose((param.float() - start.float()).mean(), torch.tensor(-1e-2), rtol=0.1)


def test_chunk_size_must_be_whole_blocks():
    with pytest.raises(ValueError, match="multiple of 256"):
        AdamW8bit([torch.nn.Parameter(torch.zeros(8))], chunk_elements=1000)
