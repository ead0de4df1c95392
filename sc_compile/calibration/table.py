"""α tables: the coefficients a cached step uses, calibrated offline, as a checked artifact.

An α file is safetensors with string metadata (the format version, the model class, the
fingerprint of the cache-point layout it was calibrated on, N, the scheduler and its timesteps and
sigmas, the granularity, β, the number of samples, per-step mean and std of α, the command that
produced it) and these float32 tensors:

The metadata also records the :class:`~sc_compile.config.ScalingCacheConfig` the calibration ran
with (``config``: the JSON of ``ScalingCacheConfig.to_dict()``, versioned).

* format 1 (the paper's): ``alpha`` [N, P], one-step α per step and cache point (eq. 5), chained
  by the runtime;
* format 2 adds the per-gap least-squares coefficients of :mod:`sc_compile.calibration.fitting`: ``coef``
  [N, K+1, K, P], ``refresh`` [N, K+1, P], ``error`` [N, K+1, K] and ``max_gap`` [N] (int64), with
  K in the metadata. ``alpha`` is still there, so the paper's chained variant stays available.
* any format may add the schedules chosen end to end at calibration
  (:class:`~sc_compile.decision.plans.SchedulePlans`): ``plans`` [M, N] bool (the full steps of
  each) and ``plan_error`` [M] (their calibrated whole-output errors), with the dynamic rule's
  error in the metadata (``plans``, JSON). A file without them means what it meant. A format-3
  table's plans also say in that JSON how many differences each was chosen with (``orders``; a file
  without them runs every plan with the table's own order).
* any format with fitted coefficients may add the calibration's check of them on a finer grid
  (:class:`FinerGridCheck`, metadata ``finer_check``, JSON): the planned default at M > N steps, run
  on the rollout samples with the table's coefficients mapped to M steps and with α = 1. A file
  without it maps the table's coefficients to every step count, as before.
* format 3 adds the two-difference coefficients (:func:`sc_compile.calibration.fitting.fit_second_order`):
  ``coef2`` [N, K+1, K+1, K, P, 2] and ``error2`` [N, K+1, K+1, K]. Its first-order tensors are
  format 2's, so a format-3 file read for its first order means what a format-2 file means.

Format-1 and format-2 files still load and mean what they meant (chained α; first-order per-gap
coefficients). Loading against a traced model refuses a file whose fingerprint, P or granularity
differ, with what differs and the command to recalibrate.
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

from sc_compile.calibration.fitting import ALPHA_LIMIT, FittedCoefficients, SecondOrderCoefficients
from sc_compile.errors import AlphaTableError

log = logging.getLogger(__name__)

FORMAT_VERSION = 3
READABLE_VERSIONS = ("1", "2", "3")
FITTED_TENSORS = ("coef", "refresh", "error", "max_gap")
SECOND_ORDER_TENSORS = ("coef2", "error2")
PLAN_TENSORS = ("plan_error", "plans")  # optional in every format
RECALIBRATE_HINT = (
    "Recalibrate for this model with `python -m sc_compile calibrate MODEL_DIR --out alpha.safetensors` "
    "(or sc_compile.calibrate(...)), or pass options={'alpha': 'ones'}."
)


@dataclasses.dataclass(frozen=True)
class SchedulePlans:
    """The end-to-end chosen schedules of an α table (optional tensors ``plans``, ``plan_error``;
    :mod:`sc_compile.decision.plans`).

    ``full`` [M, N] bool: the full steps of each kept schedule on the table's N-step grid;
    ``error`` [M]: its calibrated whole-output error, ``10·log10`` of the mean over the rollout
    samples of ``‖x − x_ref‖² / ‖x_ref‖²`` (lower is better; about minus a PSNR);
    ``reference_error``/``reference_full_steps``: the same error and the mean full steps of the
    dynamic rule (the schedule the planned default must not be worse than); ``sources``: which
    candidate each schedule was (for the report); ``samples``: rollout samples; ``orders``: per
    schedule, the differences its cached steps were judged with and run with (1 or 2; empty: the
    table's own order, as before tables stored it)."""

    full: torch.Tensor
    error: torch.Tensor
    reference_error: float
    reference_full_steps: float
    sources: tuple[str, ...] = ()
    samples: int = 0
    orders: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        full = self.full
        if not isinstance(full, torch.Tensor) or full.ndim != 2 or full.dtype != torch.bool:
            raise AlphaTableError(f"plans must be a bool tensor [plans, steps], but got {getattr(full, 'shape', full)}")
        error = self.error
        if not isinstance(error, torch.Tensor) or error.shape != (full.shape[0],):
            shape = getattr(error, "shape", error)
            raise AlphaTableError(f"plan_error must be a tensor [{full.shape[0]}], but got {shape}")
        object.__setattr__(self, "error", error.detach().to("cpu", torch.float32).contiguous())
        object.__setattr__(self, "full", full.detach().cpu().contiguous())
        if full.shape[1] >= 2 and not bool(full[:, :2].all()):
            raise AlphaTableError("every stored plan must run steps 0 and 1 in full (the first difference needs two)")
        if not torch.isfinite(self.error).all() or not math.isfinite(self.reference_error):
            raise AlphaTableError("the calibrated errors of the stored plans must be finite")
        if self.orders and (len(self.orders) != full.shape[0] or any(o not in (1, 2) for o in self.orders)):
            raise AlphaTableError(f"plan orders must be 1 or 2 for each of {full.shape[0]} plans, got {self.orders}")

    @property
    def num_steps(self) -> int:
        return int(self.full.shape[1])

    def steps(self, index: int) -> tuple[int, ...]:
        return tuple(int(s) for s in self.full[index].nonzero().flatten().tolist())

    def counts(self) -> list[int]:
        return [int(c) for c in self.full.sum(dim=1).tolist()]

    def source(self, index: int) -> str:
        return self.sources[index] if index < len(self.sources) else "stored plan"

    def order(self, index: int) -> int | None:
        """How many differences plan ``index`` was chosen with (``None``: the table's own order)."""
        return self.orders[index] if self.orders else None

    def default_index(self) -> int | None:
        """The planned default: the plan with the fewest full steps whose calibrated error stays within
        the dynamic rule's (ties: the lower error); ``None`` when no plan is that good."""
        within = [i for i, e in enumerate(self.error.tolist()) if e <= self.reference_error]
        if not within:
            return None
        counts = self.counts()
        return min(within, key=lambda i: (counts[i], float(self.error[i])))

    def index_for_budget(self, budget: int, num_steps: int) -> int | None:
        """The stored plan for ``budget`` full steps of a ``num_steps``-step run: the one whose
        count maps to ``budget`` at that step count (``None``: none does)."""
        counts = self.counts()
        matching = [i for i, c in enumerate(counts) if mapped_budget(c, self.num_steps, num_steps) == budget]
        if not matching:
            return None
        return min(matching, key=lambda i: (abs(counts[i] / self.num_steps - budget / num_steps), float(self.error[i])))


@dataclasses.dataclass(frozen=True)
class FinerGridCheck:
    """The calibration's check of a fitted table at more steps than it was calibrated at.

    A fitted coefficient is calibrated on the table's N-step grid; at N' > N steps it is looked up
    over normalised time (:mod:`sc_compile.decision.coefficients`), which held out helps on some
    models and loses to α = 1 on others (README, "Other step counts"). The calibration therefore
    runs the planned default's schedule at ``num_steps`` (M > N) on its rollout samples twice, with
    the table's mapped coefficients and with α = 1 (the same full steps), and records each sample's
    output error (dB, lower is better). Where α = 1 was better on every rollout sample
    (:attr:`ones_better`, the rule that keeps the budget planner's schedule), a generation of more
    than N steps predicts with α = 1; otherwise with the mapped table."""

    num_steps: int
    full_steps: tuple[int, ...]  # the schedule both ran, on the M-step grid
    table_errors: tuple[float, ...]  # per rollout sample: the table's coefficients mapped to M steps
    ones_errors: tuple[float, ...]  # per rollout sample: α = 1 on the same full steps
    # Per rollout sample: the dynamic rule at M steps with the coefficients the verdict chose, and its
    # mean full steps (empty: not measured). The default above N is the planned one only where its
    # error with those coefficients stays within this one (:attr:`planned_default_kept`), as at N.
    dynamic_errors: tuple[float, ...] = ()
    dynamic_full_steps: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.num_steps, int) or isinstance(self.num_steps, bool) or self.num_steps < 2:
            raise AlphaTableError(f"the finer-grid check needs a step count >= 2, got {self.num_steps!r}")
        if not self.table_errors or len(self.table_errors) != len(self.ones_errors):
            raise AlphaTableError(
                f"the finer-grid check needs one error per rollout sample for both, got {len(self.table_errors)} "
                f"and {len(self.ones_errors)}"
            )
        if not all(math.isfinite(e) for e in (*self.table_errors, *self.ones_errors, *self.dynamic_errors)):
            raise AlphaTableError("the finer-grid check's errors must be finite")
        if self.dynamic_errors and len(self.dynamic_errors) != len(self.table_errors):
            raise AlphaTableError(
                f"the finer-grid check needs one dynamic-rule error per rollout sample, got {len(self.dynamic_errors)} "
                f"for {len(self.table_errors)}"
            )
        if any(not 0 <= s < self.num_steps for s in self.full_steps) or list(self.full_steps) != sorted(
            set(self.full_steps)
        ):
            raise AlphaTableError(f"the finer-grid check's full steps must be distinct steps of {self.num_steps}")

    @property
    def ones_better(self) -> bool:
        """α = 1 was better than the mapped table on every rollout sample."""
        return all(o < t for o, t in zip(self.ones_errors, self.table_errors, strict=True))

    @property
    def planned_errors(self) -> tuple[float, ...]:
        """The planned default's errors with the coefficients the verdict chose."""
        return self.ones_errors if self.ones_better else self.table_errors

    @property
    def planned_error(self) -> float:
        """The planned default's mean error (dB) with the coefficients the verdict chose."""
        return _mean(self.planned_errors)

    @property
    def dynamic_error(self) -> float | None:
        """The dynamic rule's mean error (dB) there (``None``: not measured)."""
        return _mean(self.dynamic_errors) if self.dynamic_errors else None

    @property
    def planned_default_kept(self) -> bool:
        """The planned default stays the default above the calibrated step count: its mean error at
        ``num_steps`` is within the dynamic rule's there (the condition it met at the calibrated count),
        or the dynamic rule was not measured."""
        dynamic = self.dynamic_error
        return dynamic is None or self.planned_error <= dynamic

    @classmethod
    def assuming(cls, num_steps: int, *, ones_better: bool) -> FinerGridCheck:
        """A check with the given verdict and no measurement behind it: what the calibration's own
        rollouts run each side with."""
        return cls(num_steps, (), (1.0,) if ones_better else (0.0,), (0.0,))

    def describe(self) -> str:
        verdict = "α = 1" if self.ones_better else "the table's mapped coefficients"
        text = (
            f"checked at {self.num_steps} steps on {len(self.table_errors)} rollout samples "
            f"({len(self.full_steps)} full): table {_mean(self.table_errors):.1f} dB, α = 1 "
            f"{_mean(self.ones_errors):.1f} dB; above the calibrated step count a generation predicts with {verdict}"
        )
        if self.dynamic_error is not None:
            text += (
                f"; the dynamic rule there {self.dynamic_error:.1f} dB at {self.dynamic_full_steps:.1f} "
                "full, so "
                + ("the planned default stays the default" if self.planned_default_kept else "it is the default")
            )
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "num_steps": self.num_steps,
            "full_steps": list(self.full_steps),
            "table_errors": list(self.table_errors),
            "ones_errors": list(self.ones_errors),
            **(
                {"dynamic_errors": list(self.dynamic_errors), "dynamic_full_steps": self.dynamic_full_steps}
                if self.dynamic_errors
                else {}
            ),
        }

    @classmethod
    def from_json(cls, info: Mapping[str, Any]) -> FinerGridCheck:
        return cls(
            num_steps=int(info["num_steps"]),
            full_steps=tuple(int(s) for s in info["full_steps"]),
            table_errors=tuple(float(e) for e in info["table_errors"]),
            ones_errors=tuple(float(e) for e in info["ones_errors"]),
            dynamic_errors=tuple(float(e) for e in info.get("dynamic_errors", ())),
            dynamic_full_steps=float(info.get("dynamic_full_steps", 0.0)),
        )


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def mapped_budget(count: int, calibrated_steps: int, num_steps: int) -> int:
    """The full steps of a ``num_steps``-step run for a plan of ``count`` of ``calibrated_steps``:
    the same fraction, rounded (at least 2, at most every step)."""
    if num_steps == calibrated_steps:
        return count
    return max(2, min(num_steps, round(count * num_steps / calibrated_steps)))


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
    # Format 2: the per-gap least-squares coefficients (None: a format-1, chained-α table).
    fitted: FittedCoefficients | None = None
    # The ScalingCacheConfig the calibration ran with, as ScalingCacheConfig.to_dict() wrote it
    # (metadata "config"; None for tables written before it was recorded).
    config: Mapping[str, Any] | None = dataclasses.field(default=None, hash=False)
    # The schedules chosen end to end at calibration (None: none were chosen; tensors
    # ``plans``, ``plan_error``).
    plans: SchedulePlans | None = dataclasses.field(default=None, hash=False)
    # The calibration's check of the fitted coefficients at more steps (None: not checked; metadata
    # ``finer_check``).
    finer: FinerGridCheck | None = dataclasses.field(default=None, hash=False)

    def __post_init__(self) -> None:
        alpha = self.alpha
        if not isinstance(alpha, torch.Tensor) or alpha.ndim != 2:
            raise AlphaTableError(
                f"alpha must be a 2-D tensor [steps, points], but got {getattr(alpha, 'shape', alpha)!r}"
            )
        object.__setattr__(self, "alpha", alpha.detach().to("cpu", torch.float32).contiguous())
        # The file format's string (a config enum is one; safetensors metadata takes plain str).
        object.__setattr__(self, "granularity", str(self.granularity))
        if not torch.isfinite(self.alpha).all():
            bad = (~torch.isfinite(self.alpha)).nonzero()[:3].tolist()
            raise AlphaTableError(f"alpha has non-finite values (first at [step, point] {bad}). {RECALIBRATE_HINT}")
        if (self.alpha.abs() > ALPHA_LIMIT).any():
            bad = (self.alpha.abs() > ALPHA_LIMIT).nonzero()[0].tolist()
            raise AlphaTableError(
                f"alpha {self.alpha[tuple(bad)].item():.3g} at [step, point] {bad} is past what a fit can produce "
                f"(|alpha| <= {ALPHA_LIMIT:.0e}; see sc_compile.calibration.fitting): its predictions would not be "
                f"finite. {RECALIBRATE_HINT}"
            )
        if self.timesteps and len(self.timesteps) != self.num_steps:
            raise AlphaTableError(
                f"the table has {self.num_steps} steps but {len(self.timesteps)} timesteps in its metadata"
            )
        if self.fitted is not None and (
            self.fitted.num_steps != self.num_steps or self.fitted.num_points != self.num_points
        ):
            raise AlphaTableError(
                f"fitted coefficients for {self.fitted.num_steps} steps × {self.fitted.num_points} points do not "
                f"match alpha [{self.num_steps}, {self.num_points}]"
            )
        if self.plans is not None and self.plans.num_steps != self.num_steps:
            raise AlphaTableError(f"plans for {self.plans.num_steps} steps do not match alpha's {self.num_steps}")
        if self.finer is not None and (self.fitted is None or self.finer.num_steps <= self.num_steps):
            raise AlphaTableError(
                f"a finer-grid check at {self.finer.num_steps} steps needs fitted coefficients calibrated at fewer "
                f"steps (this table: {self.num_steps} steps, "
                + ("fitted" if self.fitted is not None else "no fitted coefficients")
                + ")"
            )

    def predicts_with_ones_at(self, num_steps: int | None) -> bool:
        """Whether a generation of ``num_steps`` steps predicts with α = 1 instead of this table's
        mapped coefficients: more steps than calibrated, where the finer-grid check found α = 1 better."""
        return (
            self.finer is not None and self.finer.ones_better and num_steps is not None and num_steps > self.num_steps
        )

    @property
    def num_steps(self) -> int:
        return int(self.alpha.shape[0])

    @property
    def num_points(self) -> int:
        return int(self.alpha.shape[1])

    @classmethod
    def ones(
        cls,
        num_steps: int,
        num_points: int,
        *,
        model_class: str = "",
        fingerprint: str = "",
        granularity: str = "block",
    ) -> AlphaTable:
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
        if self.config is not None:
            metadata["config"] = json.dumps(self.config)
        tensors = {"alpha": self.alpha}
        if self.fitted is not None:
            metadata["max_gap_limit"] = str(self.fitted.max_gap_limit)
            tensors.update({name: getattr(self.fitted, name).contiguous() for name in FITTED_TENSORS})
            if self.fitted.second is None:
                metadata["format_version"] = "2"  # nothing a format-2 reader would miss
            else:
                tensors.update({"coef2": self.fitted.second.coef.contiguous(), "error2": self.fitted.second.error})
        else:
            metadata["format_version"] = "1"  # nothing a format-1 reader would miss
        if self.plans is not None:
            tensors.update({"plans": self.plans.full.contiguous(), "plan_error": self.plans.error})
            metadata["plans"] = json.dumps(
                {
                    "reference_error": self.plans.reference_error,
                    "reference_full_steps": self.plans.reference_full_steps,
                    "sources": list(self.plans.sources),
                    "samples": self.plans.samples,
                    **({"orders": list(self.plans.orders)} if self.plans.orders else {}),
                }
            )
        if self.finer is not None:
            metadata["finer_check"] = json.dumps(self.finer.to_json())
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, os.fspath(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AlphaTable:
        from safetensors import safe_open

        path = os.fspath(path)
        try:
            with safe_open(path, framework="pt") as handle:
                metadata = handle.metadata() or {}
                keys = sorted(handle.keys())
                version = metadata.get("format_version")
                if version not in READABLE_VERSIONS:
                    raise AlphaTableError(
                        f"{path}: format_version {version!r}; this sc_compile reads {list(READABLE_VERSIONS)}"
                    )
                expected = {
                    "1": ["alpha"],
                    "2": sorted(["alpha", *FITTED_TENSORS]),
                    "3": sorted(["alpha", *FITTED_TENSORS, *SECOND_ORDER_TENSORS]),
                }[version]
                if version == "2" and [k for k in keys if k not in PLAN_TENSORS] == ["alpha"]:
                    expected = ["alpha"]  # a format-2 writer that had no fitted coefficients
                if all(name in keys for name in PLAN_TENSORS):
                    expected = sorted([*expected, *PLAN_TENSORS])
                if keys != expected:
                    raise AlphaTableError(f"{path}: expected the tensors {expected} of format {version}, found {keys}")
                tensors = {key: handle.get_tensor(key) for key in keys}
        except AlphaTableError:
            raise
        except Exception as error:  # safetensors raises its own error types for corrupt files
            raise AlphaTableError(f"{path}: not a readable α file ({error}). {RECALIBRATE_HINT}") from error
        alpha = tensors["alpha"]
        if alpha.dtype != torch.float32:
            raise AlphaTableError(f"{path}: alpha must be float32, but the file has {alpha.dtype}")
        plans = None
        if "plans" in tensors:
            try:
                info = json.loads(metadata["plans"])
                plans = SchedulePlans(
                    full=tensors["plans"],
                    error=tensors["plan_error"],
                    reference_error=float(info["reference_error"]),
                    reference_full_steps=float(info["reference_full_steps"]),
                    sources=tuple(info.get("sources", ())),
                    samples=int(info.get("samples", 0)),
                    orders=tuple(int(o) for o in info.get("orders", ())),
                )
            except (KeyError, ValueError, TypeError) as error:
                raise AlphaTableError(f"{path}: unreadable stored plans ({error!r}). {RECALIBRATE_HINT}") from None
        finer = None
        if "finer_check" in metadata:
            try:
                finer = FinerGridCheck.from_json(json.loads(metadata["finer_check"]))
            except (KeyError, ValueError, TypeError) as error:
                raise AlphaTableError(f"{path}: unreadable finer-grid check ({error!r}). {RECALIBRATE_HINT}") from None
        fitted = None
        if "coef" in tensors:
            try:
                second = (
                    SecondOrderCoefficients(coef=tensors["coef2"], error=tensors["error2"])
                    if "coef2" in tensors
                    else None
                )
                fitted = FittedCoefficients(**{name: tensors[name] for name in FITTED_TENSORS}, second=second)
            except ValueError as error:
                raise AlphaTableError(f"{path}: {error}. {RECALIBRATE_HINT}") from None
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
                extra={k[len("extra.") :]: v for k, v in metadata.items() if k.startswith("extra.")},
                fitted=fitted,
                config=json.loads(metadata["config"]) if "config" in metadata else None,
                plans=plans,
                finer=finer,
            )
        except KeyError as error:
            raise AlphaTableError(f"{path}: metadata lacks {error.args[0]!r}. {RECALIBRATE_HINT}") from None
        except AlphaTableError as error:
            raise AlphaTableError(f"{path}: {error}") from None
        return table

    # -- use -----------------------------------------------------------------------------------
    def check_compatible(
        self, *, model_class: str, fingerprint: str, num_points: int, granularity: str, source: str = "α table"
    ) -> None:
        """Raise :class:`AlphaTableError` saying what differs when the table does not fit."""
        problems = []
        if self.granularity != granularity:
            problems.append(f"granularity {self.granularity!r} (the model is compiled with {str(granularity)!r})")
        if self.num_points != num_points:
            problems.append(f"{self.num_points} cache points (the model has {num_points})")
        if self.fingerprint != fingerprint:
            problems.append(
                f"layout fingerprint {self.fingerprint} of a {self.model_class or 'model'} "
                f"(this {model_class} has {fingerprint})"
            )
        if problems:
            raise AlphaTableError(
                f"{source} does not fit this model: it has " + "; ".join(problems) + f". {RECALIBRATE_HINT}"
            )

    def __repr__(self) -> str:
        mean = float(self.alpha.mean())
        return (
            f"AlphaTable(model_class={self.model_class!r}, steps={self.num_steps}, points={self.num_points}, "
            f"granularity={self.granularity!r}, fingerprint={self.fingerprint!r}, scheduler={self.scheduler!r}, "
            f"samples={self.num_samples}, beta={self.beta}, alpha mean={mean:.3f} "
            f"range=[{float(self.alpha.min()):.3f}, {float(self.alpha.max()):.3f}]"
            + ("" if self.fitted is None else f", fitted per-gap coefficients K={self.fitted.max_gap_limit}")
            + ("" if self.fitted is None or self.fitted.second is None else " with two differences")
            + ("" if self.plans is None else f", {self.plans.full.shape[0]} end-to-end plans")
            + ("" if self.finer is None else f", checked at {self.finer.num_steps} steps")
            + ")"
        )


def resolve_alpha_source(
    alpha: Any,
    *,
    model_class: str,
    fingerprint: str,
    num_points: int,
    granularity: str,
    search_dirs: Sequence[Path] = (),
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
                    table.check_compatible(
                        model_class=model_class,
                        fingerprint=fingerprint,
                        num_points=num_points,
                        granularity=granularity,
                        source=os.fspath(path),
                    )
                    log.info("using the shipped α table %s for %s", path, model_class)
                    return table
        from sc_compile.reporting.console import log_above_progress_bars

        # Compiling happens at the first call, inside the pipeline's progress bar: said above it.
        log_above_progress_bars(
            log,
            logging.WARNING,
            "ScalingCache: no α table for %s (layout %s, %s granularity); running with α = 1. Calibrate one: "
            "for a pipeline in memory, table = sc_compile.calibrate(pipe, [call kwargs, ...]) and "
            "table.save('alpha.safetensors'); for a pipeline saved with save_pretrained, "
            "sc-compile calibrate MODEL_DIR --out alpha.safetensors. Then compile with "
            "options={'alpha': 'alpha.safetensors'}.",
            model_class,
            fingerprint,
            granularity,
        )
        return None
    table = alpha if isinstance(alpha, AlphaTable) else AlphaTable.load(alpha)
    source = "the given α table" if isinstance(alpha, AlphaTable) else os.fspath(alpha)
    table.check_compatible(
        model_class=model_class, fingerprint=fingerprint, num_points=num_points, granularity=granularity, source=source
    )
    return table
