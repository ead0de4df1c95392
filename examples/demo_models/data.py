"""Fashion-MNIST data for the demo models.

The data comes from the Debian package ``dataset-fashion-mnist`` (gzipped IDX
files under ``/usr/share/datasets/fashion-mnist``). No network access is used.
The directory can be overridden with the ``SC_COMPILE_FASHION_MNIST`` environment
variable (a directory holding the same four ``*-idx?-ubyte[.gz]`` files).
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import struct
from pathlib import Path

import torch
import torch.nn.functional as F

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "SC_COMPILE_FASHION_MNIST"

CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIZE = 28

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def data_dir() -> Path:
    """Directory holding the Fashion-MNIST IDX files."""
    return Path(os.environ.get(ENV_VAR, str(DEFAULT_DIR)))


def _find(stem: str) -> Path:
    d = data_dir()
    for name in (stem + ".gz", stem):
        p = d / name
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {d}. Install the data with "
        "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu package; files go to "
        f"{DEFAULT_DIR}), or point ${ENV_VAR} at a directory holding the IDX files."
    )


def _read_idx(path: Path) -> torch.Tensor:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    offset = 4 + 4 * ndim
    n = math.prod(dims)
    if len(raw) - offset != n:
        raise ValueError(f"{path}: truncated IDX file ({len(raw) - offset} != {n} bytes)")
    return torch.frombuffer(bytearray(raw[offset:]), dtype=torch.uint8).reshape(dims)


@functools.lru_cache(maxsize=2)
def load_fashion_mnist(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)``: uint8 ``[N, 28, 28]`` and int64 ``[N]``.

    ``split`` is ``"train"`` (60000 items) or ``"test"`` (10000 items).
    The returned tensors are cached; do not modify them in place.
    """
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
    img_stem, lbl_stem = _FILES[split]
    images = _read_idx(_find(img_stem))
    labels = _read_idx(_find(lbl_stem)).long()
    if images.shape[0] != labels.shape[0]:
        raise ValueError("Fashion-MNIST images and labels differ in length")
    return images, labels


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., H, W]`` in 0..255 -> float32 in [-1, 1]."""
    return images.float().div(127.5).sub(1.0)


def from_unit_range(x: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> float in [0, 1] (clamped)."""
    return x.add(1.0).mul(0.5).clamp(0.0, 1.0)


def load_images_float(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(x, labels)`` with ``x`` float32 ``[N, 1, 28, 28]`` in [-1, 1]."""
    images, labels = load_fashion_mnist(split)
    return to_unit_range(images).unsqueeze(1), labels


def class_means(split: str = "train", size: int = IMAGE_SIZE) -> torch.Tensor:
    """Per-class mean images, float32 ``[10, size, size]`` in [0, 1]."""
    images, labels = load_fashion_mnist(split)
    x = images.float() / 255.0
    means = torch.stack([x[labels == c].mean(0) for c in range(NUM_CLASSES)])
    if size != IMAGE_SIZE:
        means = center_pad(means, size, value=0.0)
    return means


def center_pad(x: torch.Tensor, size: int, value: float = -1.0) -> torch.Tensor:
    """Pad (or crop) the last two dims of ``x`` symmetrically to ``size x size``."""
    h, w = x.shape[-2:]
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(x, (left, size - w - left, top, size - h - top), value=value)


def center_crop(x: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Crop the last two dims of ``x`` to the central ``size x size`` window."""
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


def make_clips(
    images: torch.Tensor,
    num_frames: int = 9,
    size: int = 32,
    seed: int | torch.Generator = 0,
    max_shift: float = 0.5,
    max_rotation: float = 2.5,
) -> torch.Tensor:
    """Make short moving clips, one per input image.

    Each clip starts with the item centred on a ``size x size`` canvas and then
    drifts with a constant velocity (up to ``max_shift`` pixels per frame in x and
    in y) while rotating at a constant rate (up to ``max_rotation`` degrees per
    frame). Motion is drawn from ``seed`` (an int or a ``torch.Generator``), so
    the result is deterministic.

    ``images``: uint8 ``[N, 28, 28]`` / ``[N, 1, 28, 28]`` or float in [-1, 1].
    Returns float32 ``[N, 1, num_frames, size, size]`` in [-1, 1] (background -1),
    the ``[B, C, F, H, W]`` layout of video pipelines.
    """
    if images.dtype == torch.uint8:
        x = to_unit_range(images)
    else:
        x = images.float()
    if x.dim() == 3:
        x = x.unsqueeze(1)
    n = x.shape[0]
    x = center_pad(x, size, value=-1.0)
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    vel = (torch.rand(n, 2, generator=gen) * 2 - 1) * max_shift  # pixels / frame
    omega = (torch.rand(n, generator=gen) * 2 - 1) * max_rotation * math.pi / 180.0  # rad / frame

    t = torch.arange(num_frames, dtype=torch.float32)
    ang = omega[:, None] * t[None]  # [N, F]
    shift = vel[:, None, :] * t[None, :, None] * (2.0 / size)  # [N, F, 2] in normalized coords
    cos, sin = torch.cos(ang), torch.sin(ang)
    # output pixel p samples the input at R(-ang) (p - shift)
    theta = torch.zeros(n, num_frames, 2, 3)
    theta[..., 0, 0] = cos
    theta[..., 0, 1] = sin
    theta[..., 1, 0] = -sin
    theta[..., 1, 1] = cos
    theta[..., 0, 2] = -(cos * shift[..., 0] + sin * shift[..., 1])
    theta[..., 1, 2] = -(-sin * shift[..., 0] + cos * shift[..., 1])
    theta = theta.reshape(n * num_frames, 2, 3)
    src = x.unsqueeze(1).expand(n, num_frames, 1, size, size).reshape(n * num_frames, 1, size, size)
    grid = F.affine_grid(theta, [n * num_frames, 1, size, size], align_corners=False)
    # sample in [0, 2] with zero padding, i.e. background -1 outside the canvas
    out = F.grid_sample(src + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = (out - 1.0).clamp(-1.0, 1.0)
    return out.reshape(n, num_frames, 1, size, size).permute(0, 2, 1, 3, 4).contiguous()
