"""α tables: the differential scaling coefficients α[t][p] of paper eq. 5, as a checked artifact.

An α file is safetensors with one float32 tensor ``alpha`` of shape [N, P] (steps × cache points)
and string metadata: the format version, the model class, the fingerprint of the cache-point
layout it was calibrated on, N, the scheduler and its timesteps, the granularity, β, the number
of samples, per-step mean and std of α, and the command that produced it. Loading against a traced
model refuses a file whose fingerprint, P or granularity differ, with what differs and the command
to recalibrate.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
RECALIBRATE_HINT = (
    "Recalibrate for this model with `python -m sc_compile calibrate MODEL_DIR --out alpha.safetensors` "
    "(or sc_compile.calibrate(...)), or pass options={'alpha': 'ones'}."
)


class AlphaTableError(ValueError):
    """An α table is malformed or does not fit the model it is used with."""


@dataclasses.dataclass(frozen=True)
class AlphaTable:
    """α[t][p] for N steps and P cache points, plus where it came from."""

    alpha: torch.Tensor  # [N, P] float32
    model_class: str
    fingerprint: str
    granularity: str
    timesteps: tuple[float, ...] = ()
    scheduler: str = ""
    sigmas: tuple[float, ...] = ()
    beta: float = 0.97
    num_samples: int = 0
    command: str = ""
    extra: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        alpha = self.alpha
        if not isinstance(alpha, torch.Tensor) or alpha.ndim != 2:
            raise AlphaTableError(f"alpha must be a 2-D tensor [steps, points], but got {getattr(alpha, 'shape', alpha)!r}")
        object.__setattr__(self, "alpha", alpha.detach().to("cpu", torch.float32).contiguous())
        if not torch.isfinite(self.alpha).all():
            bad = (~torch.isfinite(self.alpha)).nonzero()[:3].tolist()
            raise AlphaTableError(f"alpha has non-finite values (first at [step, point] {bad}). {RECALIBRATE_HINT}")
        if self.timesteps and len(self.timesteps) != self.num_steps:
            raise AlphaTableError(
                f"the table has {self.num_steps} steps but {len(self.timesteps)} timesteps in its metadata"
            )

    @property
    def num_steps(self) -> int:
        return int(self.alpha.shape[0])

    @property
    def num_points(self) -> int:
        return int(self.alpha.shape[1])

    @classmethod
    def ones(cls, num_steps: int, num_points: int, *, model_class: str = "", fingerprint: str = "", granularity: str = "block") -> AlphaTable:
        return cls(torch.ones(num_steps, num_points), model_class, fingerprint, granularity)

    def step_statistics(self) -> tuple[list[float], list[float]]:
        """Mean and std of α over points, per step."""
        mean = self.alpha.mean(dim=1)
        std = self.alpha.std(dim=1, unbiased=False)
        return mean.tolist(), std.tolist()

    # -- files ---------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        from safetensors.torch import save_file

        mean, std = self.step_statistics()
        metadata = {
            "format_version": str(FORMAT_VERSION),
            "model_class": self.model_class,
            "fingerprint": self.fingerprint,
            "granularity": self.granularity,
            "num_steps": str(self.num_steps),
            "num_points": str(self.num_points),
            "timesteps": json.dumps(list(self.timesteps)),
            "scheduler": self.scheduler,
            "sigmas": json.dumps(list(self.sigmas)),
            "beta": repr(self.beta),
            "num_samples": str(self.num_samples),
            "alpha_step_mean": json.dumps(mean),
            "alpha_step_std": json.dumps(std),
            "command": self.command,
            **{f"extra.{k}": v for k, v in self.extra.items()},
        }
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file({"alpha": self.alpha}, os.fspath(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AlphaTable:
        from safetensors import safe_open

        path = os.fspath(path)
        try:
            with safe_open(path, framework="pt") as handle:
                metadata = handle.metadata() or {}
                keys = list(handle.keys())
                if keys != ["alpha"]:
                    raise AlphaTableError(f"{path}: expected one tensor 'alpha', found {keys}")
                alpha = handle.get_tensor("alpha")
        except AlphaTableError:
            raise
        except Exception as error:  # safetensors raises its own error types for corrupt files
            raise AlphaTableError(f"{path}: not a readable α file ({error}). {RECALIBRATE_HINT}") from error
        version = metadata.get("format_version")
        if version != str(FORMAT_VERSION):
            raise AlphaTableError(f"{path}: format_version {version!r}, this sc_compile reads {FORMAT_VERSION}")
        if alpha.dtype != torch.float32:
            raise AlphaTableError(f"{path}: alpha must be float32, but the file has {alpha.dtype}")
        try:
            table = cls(
                alpha=alpha,
                model_class=metadata["model_class"],
                fingerprint=metadata["fingerprint"],
                granularity=metadata["granularity"],
                timesteps=tuple(json.loads(metadata.get("timesteps", "[]"))),
                scheduler=metadata.get("scheduler", ""),
                sigmas=tuple(json.loads(metadata.get("sigmas", "[]"))),
                beta=float(metadata.get("beta", "0.97")),
                num_samples=int(metadata.get("num_samples", "0")),
                command=metadata.get("command", ""),
                extra={k[len("extra."):]: v for k, v in metadata.items() if k.startswith("extra.")},
            )
        except KeyError as error:
            raise AlphaTableError(f"{path}: metadata lacks {error.args[0]!r}. {RECALIBRATE_HINT}") from None
        return table

    # -- use -----------------------------------------------------------------------------------
    def check_compatible(self, *, model_class: str, fingerprint: str, num_points: int, granularity: str, source: str = "α table") -> None:
        """Raise :class:`AlphaTableError` saying what differs when the table does not fit."""
        problems = []
        if self.granularity != granularity:
            problems.append(f"granularity {self.granularity!r} (the model is compiled with {granularity!r})")
        if self.num_points != num_points:
            problems.append(f"{self.num_points} cache points (the model has {num_points})")
        if self.fingerprint != fingerprint:
            problems.append(
                f"layout fingerprint {self.fingerprint} of a {self.model_class or 'model'} "
                f"(this {model_class} has {fingerprint})"
            )
        if problems:
            raise AlphaTableError(f"{source} does not fit this model: it has " + "; ".join(problems) + f". {RECALIBRATE_HINT}")

    def matches_schedule(self, step: int, timestep: float) -> bool:
        """Whether ``step`` of the running generation is the calibrated step (same timestep)."""
        if step >= self.num_steps:
            return False
        if not self.timesteps:
            return True
        reference = self.timesteps[step]
        return math.isclose(reference, timestep, rel_tol=1e-4, abs_tol=1e-6)

    def resampled_row(self, timestep: float) -> list[float]:
        """α at ``timestep`` by linear interpolation over the calibrated timesteps."""
        if not self.timesteps:
            raise AlphaTableError("this α table has no timesteps to resample over")
        times = torch.tensor(self.timesteps, dtype=torch.float64)
        descending = bool(times[0] > times[-1])
        if descending:
            times = times.flip(0)
        alpha = self.alpha.double().flip(0) if descending else self.alpha.double()
        t = min(max(timestep, float(times[0])), float(times[-1]))
        upper = int(torch.searchsorted(times, torch.tensor(t, dtype=torch.float64)).clamp(1, len(times) - 1))
        lower = upper - 1
        span = float(times[upper] - times[lower])
        weight = 0.0 if span == 0 else (t - float(times[lower])) / span
        row = alpha[lower] * (1 - weight) + alpha[upper] * weight
        return row.tolist()

    def __repr__(self) -> str:
        mean = float(self.alpha.mean())
        return (
            f"AlphaTable(model_class={self.model_class!r}, steps={self.num_steps}, points={self.num_points}, "
            f"granularity={self.granularity!r}, fingerprint={self.fingerprint!r}, scheduler={self.scheduler!r}, "
            f"samples={self.num_samples}, beta={self.beta}, alpha mean={mean:.3f} "
            f"range=[{float(self.alpha.min()):.3f}, {float(self.alpha.max()):.3f}])"
        )


def resolve_alpha_source(
    alpha: Any, *, model_class: str, fingerprint: str, num_points: int, granularity: str, search_dirs: Sequence[Path] = ()
) -> AlphaTable | None:
    """The table to use, checked against the model; ``None`` means α = 1.

    With ``alpha=None`` the shipped tables in ``search_dirs`` are searched by fingerprint; if none
    fits, one warning says how to calibrate and α = 1 is used.
    """
    if isinstance(alpha, str) and alpha == "ones":
        return None
    if alpha is None:
        for directory in search_dirs:
            from safetensors import safe_open

            # Shipped α files are named alpha*.safetensors; weights beside them are not read.
            for path in sorted(Path(directory).glob("**/alpha*.safetensors")):
                with safe_open(os.fspath(path), framework="pt") as handle:
                    meta = handle.metadata() or {}
                if meta.get("fingerprint") == fingerprint and meta.get("granularity") == granularity:
                    table = AlphaTable.load(path)
                    table.check_compatible(model_class=model_class, fingerprint=fingerprint, num_points=num_points, granularity=granularity, source=os.fspath(path))
                    log.info("using the shipped α table %s for %s", path, model_class)
                    return table
        log.warning(
            "ScalingCache: no α table for %s (layout %s, %s granularity); running with α = 1. "
            "Calibrate one with `python -m sc_compile calibrate MODEL_DIR --out alpha.safetensors` and "
            "pass options={'alpha': 'alpha.safetensors'}.",
            model_class,
            fingerprint,
            granularity,
        )
        return None
    table = alpha if isinstance(alpha, AlphaTable) else AlphaTable.load(alpha)
    source = "the given α table" if isinstance(alpha, AlphaTable) else os.fspath(alpha)
    table.check_compatible(model_class=model_class, fingerprint=fingerprint, num_points=num_points, granularity=granularity, source=source)
    return table
