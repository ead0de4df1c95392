"""Fidelity metrics used everywhere (demo, benchmarks, tests): PSNR and SSIM in plain torch.

Images are float tensors in [0, 1] shaped [..., C, H, W] (videos: frames folded into the leading
dimensions). SSIM follows Wang et al. 2004 with a Gaussian window (σ = 1.5, 11 taps, clipped to
the image size), K1 = 0.01, K2 = 0.03 and data range 1, computed per channel and averaged: the
same definition as ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
sigma=1.5, use_sample_covariance=False, data_range=1)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def psnr(prediction: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over all elements (``inf`` for identical inputs)."""
    if prediction.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(prediction.shape)} vs {tuple(reference.shape)}")
    mse = torch.mean((prediction.double() - reference.double()) ** 2).item()
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype) - (size - 1) / 2
    window = torch.exp(-(coords**2) / (2 * sigma**2))
    return window / window.sum()


def ssim(prediction: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean structural similarity over images and channels (see the module docstring)."""
    if prediction.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(prediction.shape)} vs {tuple(reference.shape)}")
    if prediction.ndim < 3:
        raise ValueError(f"expected [..., C, H, W], got shape {tuple(prediction.shape)}")
    height, width = prediction.shape[-2:]
    x = prediction.double().reshape(-1, 1, height, width)
    y = reference.double().reshape(-1, 1, height, width)
    size = min(11, height, width)
    if size % 2 == 0:
        size -= 1
    # skimage truncates the Gaussian at 3.5 σ: radius int(3.5 * 1.5 + 0.5) = 5 -> 11 taps.
    g = _gaussian_window(size, 1.5, torch.float64)
    window_h = g.reshape(1, 1, size, 1)
    window_w = g.reshape(1, 1, 1, size)

    def blur(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(z, window_h), window_w)

    mu_x, mu_y = blur(x), blur(y)
    sigma_xx = blur(x * x) - mu_x**2
    sigma_yy = blur(y * y) - mu_y**2
    sigma_xy = blur(x * y) - mu_x * mu_y
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    numerator = (2 * mu_x * mu_y + c1) * (2 * sigma_xy + c2)
    denominator = (mu_x**2 + mu_y**2 + c1) * (sigma_xx + sigma_yy + c2)
    return (numerator / denominator).mean().item()
