"""Is a demo pipeline trained? A class-separability statistic of generated samples.

``class_separability(pipe, emb)`` generates ``samples_per_class`` samples for each
of the 10 classes and classifies every sample by its nearest Fashion-MNIST class
mean (L2 in [0, 1] pixel space, class means of the training split). The
``accuracy`` of that nearest-class-mean classifier is ~0.1 for an untrained
model; on real Fashion-MNIST test images it is ``reference_accuracy()`` (~0.68).
For the video pipeline the first frame of each clip (the item centred and
upright, see :func:`examples.demo_models.data.make_clips`) is cropped to 28x28 and used.

    python -m examples.demo_models.check --model flux --samples-per-class 2   # from the repository root
"""

from __future__ import annotations

from typing import Any

import torch

from sc_compile.demo.sampling import generate

from .data import NUM_CLASSES, center_crop, class_means, load_fashion_mnist


def nearest_class_mean(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``images`` float ``[N, 28, 28]`` in [0, 1] -> (predicted class ``[N]``, distances ``[N, 10]``)."""
    means = class_means("train").to(images.device, images.dtype)
    d = torch.cdist(images.reshape(images.shape[0], -1), means.reshape(NUM_CLASSES, -1))
    return d.argmin(dim=1), d


def reference_accuracy(split: str = "test") -> float:
    """Nearest-class-mean accuracy on real Fashion-MNIST images (for comparison)."""
    images, labels = load_fashion_mnist(split)
    pred, _ = nearest_class_mean(images.float() / 255.0)
    return (pred == labels).float().mean().item()


@torch.no_grad()
def generate_per_class(
    pipe: Any,
    emb: Any,
    samples_per_class: int = 1,
    guidance_scale: float = 3.0,
    num_inference_steps: int = 20,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate ``samples_per_class`` samples for every class.

    Returns ``(samples, labels)``: images ``[N, 1, 28, 28]`` (Flux) or clips
    ``[N, F, 1, 32, 32]`` (Wan), float in [0, 1], on the CPU.
    """
    labels = torch.arange(NUM_CLASSES).repeat_interleave(samples_per_class)
    return generate(pipe, emb, labels, guidance_scale, num_inference_steps, seed), labels


def class_separability(
    pipe: Any,
    emb: Any,
    samples_per_class: int = 1,
    guidance_scale: float = 3.0,
    num_inference_steps: int = 20,
    seed: int = 0,
) -> dict[str, Any]:
    """Nearest-class-mean accuracy of generated samples (1.0 = every class recognised).

    Returns a dict with ``accuracy`` (float), ``predictions`` and ``labels`` (lists),
    ``margin`` (mean over samples of: distance to the nearest *other* class mean minus
    distance to the own class mean; > 0 means samples sit closer to their own class)
    and ``samples`` (the generated tensor).
    """
    samples, labels = generate_per_class(pipe, emb, samples_per_class, guidance_scale, num_inference_steps, seed)
    if samples.dim() == 5:  # video [N, F, C, H, W] -> first frame, centre 28x28
        images = center_crop(samples[:, 0, 0], 28)
    else:
        images = samples[:, 0]
    pred, d = nearest_class_mean(images)
    own = d.gather(1, labels[:, None]).squeeze(1)
    other = d.scatter(1, labels[:, None], float("inf")).min(dim=1).values
    return {
        "accuracy": (pred == labels).float().mean().item(),
        "margin": (other - own).mean().item(),
        "predictions": pred.tolist(),
        "labels": labels.tolist(),
        "samples": samples,
    }


def save_grid(samples: torch.Tensor, path: str, columns: int | None = None) -> None:
    """Save samples (``[N, 1, H, W]`` images or ``[N, F, 1, H, W]`` clips, in [0, 1]) as a PNG.

    Images are laid out ``columns`` per row; clips one per row, frames left to right.
    """
    from PIL import Image

    s = samples.detach().float().cpu().clamp(0, 1)
    if s.dim() == 5:
        rows = [torch.cat(list(clip[:, 0]), dim=1) for clip in s]  # [H, F*W]
    else:
        cols = columns or NUM_CLASSES
        imgs = list(s[:, 0])
        while len(imgs) % cols:
            imgs.append(torch.zeros_like(imgs[0]))
        rows = [torch.cat(imgs[i : i + cols], dim=1) for i in range(0, len(imgs), cols)]
    grid = torch.cat(rows, dim=0)
    Image.fromarray((grid.numpy() * 255).round().astype("uint8"), mode="L").save(path)


def main() -> None:
    import argparse

    from sc_compile.demo.models import load_flux_demo, load_sd3_demo, load_wan_demo

    ap = argparse.ArgumentParser(
        prog="python -m examples.demo_models.check", description="Class separability of the shipped demo models"
    )
    ap.add_argument("--model", choices=["flux", "wan", "sd3"], default="flux")
    ap.add_argument("--path", default=None, help="weights dir (default: the shipped demo_<model>)")
    ap.add_argument("--samples-per-class", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--grid", default=None, help="write the samples to this PNG")
    a = ap.parse_args()
    loader = {"flux": load_flux_demo, "wan": load_wan_demo, "sd3": load_sd3_demo}[a.model]
    pipe, emb = loader(path=a.path)
    r = class_separability(pipe, emb, a.samples_per_class, a.guidance, a.steps)
    print(f"accuracy={r['accuracy']:.3f} margin={r['margin']:.4f} predictions={r['predictions']}")
    print(f"reference (real test images) accuracy={reference_accuracy():.3f}")
    if a.grid:
        save_grid(r["samples"], a.grid)


if __name__ == "__main__":
    main()
