"""The one configuration object of the backend, and how ``options={...}`` become one.

``torch.compile(model, backend="scalingcache", options={...})`` hands every option to the backend.
The names below are ScalingCache's; every other name must be an Inductor option (they keep their
meaning and go to Inductor as config patches); anything else is an error naming the valid keys.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from sc_compile.contract import OptionEnum, Statistic

if TYPE_CHECKING:
    from sc_compile.calibration.table import AlphaTable


class Prediction(OptionEnum):
    """What the cache buffers hold and a cached step extrapolates."""

    HIDDEN = "hidden"
    """The hidden state at each cache point (the paper's setting): ``y_t = y_full + c_t · Δ``."""
    RESIDUAL = "residual"
    """The point's residual over its block's input, added to the block's input of the current step:
    ``y_t = a_t + r_full + c_t · Δr`` with ``r = y − a`` and ``a`` the block input carried along
    the residual stream (the value ``y`` would have with every residual branch of the block zero).
    At a cached step the block inputs are the previous blocks' predictions, so for the first block
    ``a_t`` is the current step's input of the block stack (TeaCache / FirstBlockCache style)."""


class Granularity(OptionEnum):
    """Where the cache points sit."""

    BLOCK = "block"
    """Each top-level block's outputs (both streams of a two-stream MMDiT block)."""
    MODULE = "module"
    """Each residual module's output (attention, feed-forward) inside every block."""


class InnerCompiler(OptionEnum):
    """What compiles the specialised full-step and cached-step graphs."""

    INDUCTOR = "inductor"
    """``torch._inductor.compile_fx``: the product setting."""
    AOT_EAGER = "aot_eager"
    """AOT Autograd tracing without code generation: fast compiles, for debugging and tests."""
    EAGER = "eager"
    """Run the FX graphs as they are: fastest compiles, for debugging and tests."""


class ChangePoints(OptionEnum):
    """Which cache points the per-step change ē averages over."""

    ALL = "all"
    """Every cache point (paper eq. 7)."""
    OUTPUT = "output"
    """Only the points the output head reads at a cached step."""


class Coefficients(OptionEnum):
    """Which coefficients of an α table a cached step multiplies."""

    FITTED = "fitted"
    """Per-gap least-squares coefficients fitted for the gaps the runtime takes (format-2 tables;
    see :mod:`sc_compile.calibration.fitting`)."""
    CHAINED = "chained"
    """The paper's one-step α's, chained: ``c = Σ_j Π_i α`` (every table has them)."""


class Schedule(OptionEnum):
    """Which rule places the full steps when no budget (``full_steps``, ``speedup``) and no
    ``static_interval`` is given."""

    DYNAMIC = "dynamic"
    """The paper's rule: a step runs in full when the change accumulated since the last full step
    exceeds the mean change of the full steps (ε > δ)."""
    PLANNED = "planned"
    """The α table's stored end-to-end plan with the largest speed-up whose calibrated error stays
    within the dynamic rule's, mapped to the generation's step count (needs a table calibrated with
    ``plan_samples``; see :mod:`sc_compile.decision.plans`)."""


class Fallback(OptionEnum):
    """What happens when the model cannot be cached (no blocks, unsupported graph)."""

    ERROR = "error"
    """Raise an error that says what was looked for (the default: never silently uncached)."""
    INDUCTOR = "inductor"
    """Compile the graph uncached with the inner compiler and log a warning."""


class StochasticSampler(OptionEnum):
    """What a generation whose sampler injects fresh noise every step does (detected by
    ``sc_compile.enable``, declared with ``sc_compile.generation(..., stochastic_sampler=True)``)."""

    REFUSE = "refuse"
    """Raise an error that says why and how to keep fidelity (the default)."""
    WARN = "warn"
    """Cache anyway and warn once per generation: cached steps never see the injected noise."""


def is_int_at_least(value: object, minimum: int | None) -> bool:
    """Whether ``value`` is an int (a bool is not) and at least ``minimum`` (``None``: any int)."""
    return isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum)


# The version ScalingCacheConfig.to_dict writes, and the versions from_dict reads.
CONFIG_VERSION = 1
READABLE_CONFIG_VERSIONS = (1,)

# The schedule without a budget, a static interval or the schedule option, chosen on held-out data
# (README, "α tables", "Schedules chosen end to end"). A table without stored plans runs the dynamic
# rule whatever this is. With it dynamic, a generation of more steps than a table with plans was
# calibrated at runs the stored default plan (``Decisions``): the dynamic rule lost there.
DEFAULT_SCHEDULE = Schedule.DYNAMIC

# Paper setting: S_f = 10 full warm-up steps out of 50.
REFERENCE_WARMUP_STEPS = 10
REFERENCE_NUM_STEPS = 50
MIN_WARMUP_STEPS = 2
# A warm-up no generation reaches: every step full (calibration's runs; asked for on purpose, so not warned).
ALL_FULL_WARMUP = 1 << 30


@dataclasses.dataclass(frozen=True)
class ScalingCacheConfig:
    """Everything ScalingCache takes. Every field is also a key of ``torch.compile(options=...)``."""

    warmup_steps: int | None = None
    """S_f, the first steps that always run in full (at least 2: the first difference needs two
    full steps). ``None``: 10, the paper's setting for 50 steps, scaled to 20% of the steps (at
    least 2) when the step count is known (``num_inference_steps`` or :func:`sc_compile.generation`)
    and below 50."""

    alpha: str | os.PathLike[str] | AlphaTable | None = None
    """α: a path to an α file (safetensors), an :class:`~sc_compile.calibration.table.AlphaTable`, or ``"ones"``
    (α = 1, TaylorSeer-style first-order prediction). ``None``: the table shipped in ``assets/``
    for this model's layout if there is one, else α = 1 with one warning that says how to
    calibrate."""

    granularity: Granularity = Granularity.BLOCK
    """Cache points at block outputs (default) or at every residual module's output."""

    prediction: Prediction = Prediction.HIDDEN
    """Predict the hidden state (default, the paper's) or the residual over the current block input
    (ablation; see :class:`Prediction`). Each has its own α table (the layout fingerprints differ)."""

    final_full_steps: int = 0
    """Force the last steps of a generation to run in full (needs the step count to be known)."""

    share_decision_across_streams: bool = True
    """With guidance as separate calls per step (cond, uncond), whether the streams take one shared
    full/cached decision (the paper's setting) or each stream decides on its own changes."""

    compiler: InnerCompiler = InnerCompiler.INDUCTOR
    """The inner compiler of both specialised graphs."""

    num_inference_steps: int | None = None
    """The pipeline's step count when known in advance; :func:`sc_compile.generation` overrides it
    per generation. Scales the default warm-up and enables ``final_full_steps``."""

    fallback: Fallback = Fallback.ERROR
    """What to do with a model ScalingCache cannot cache."""

    static_interval: int | None = None
    """Ablation setting: after the warm-up, run every ``static_interval``-th step in full instead of
    deciding by the accumulated change (the paper's static-interval baseline). ``None``: dynamic."""

    change_points: ChangePoints = ChangePoints.ALL
    """Which cache points the per-step change ē averages over: ``"all"`` (the paper's eq. 7) or
    ``"output"``, only the points the output head reads."""

    cache_dtype: torch.dtype | None = None
    """dtype of the full cache buffers; ``None``: the dtype of each cached hidden state."""

    statistic: Statistic = Statistic.SUBSAMPLE
    """What a cache point that no cached step reads keeps for the change statistic ē and for
    calibration: ``"subsample"`` (default), a fixed strided subsample of its elements in float32
    (at most 2 % of one hidden state's bytes), or ``"full"``, both full buffers (the exact
    statistic, ~2 hidden states per point). The points the output reads always keep full buffers."""

    max_cache_bytes: int | None = None
    """The most bytes the cache state of one generation may hold on this process (all streams
    together). A layout whose one stream exceeds it is refused when it is compiled, and a
    generation whose streams together exceed it is refused before the stream that would exceed it
    is allocated; both errors give the bytes and the options that would fit. ``None``: on a CUDA
    device, the device's free memory when the graph is compiled; elsewhere no limit."""

    full_steps: int | None = None
    """Budget: run exactly this many full steps per generation, at the steps that minimise the α
    table's calibrated error of the whole generation (dynamic programming over segments; without a
    fitted table the full steps are spread evenly) after the warm-up. The default warm-up is
    shortened, down to 2 steps, when the budget could not be met after it. Needs the step count.
    ``None``: no budget."""

    speedup: float | None = None
    """Budget as a target ratio of steps to full steps: ``full_steps = round(steps / speedup)``."""

    propagation: float = 0.0
    """How a budget's plan weighs inherited errors: the gain ρ of the error model in
    :mod:`sc_compile.decision.budget` (a cached step extrapolates from full steps that the cached
    steps before them perturbed). ``0``: the error of the generation is the sum of its one-step
    errors."""

    schedule: Schedule | None = None
    """The schedule without a budget or static interval: ``"dynamic"`` (the paper's ε > δ rule) or
    ``"planned"`` (the table's stored end-to-end plan, :class:`Schedule`). ``None``: dynamic, but the
    stored plan above the step count a table with plans was calibrated at (:data:`DEFAULT_SCHEDULE`).
    Giving it with ``full_steps``, ``speedup`` or ``static_interval`` is an error."""

    coefficients: Coefficients | None = None
    """The α table's per-gap fitted coefficients or the paper's chained α's. ``None``: fitted when
    the table has them (format 2), else chained."""

    stochastic_sampler: StochasticSampler = StochasticSampler.REFUSE
    """A sampler that injects fresh noise every step: refuse (default) or cache with a warning."""

    predictor_order: int | None = None
    """How many past differences a cached step's prediction reads: ``1`` (``y_full + c·dy``) or
    ``2`` (``+ c₂·dy_prev``, the two-difference coefficients of a format-3 table: one more buffer per
    cache point and stream). ``None``: what the α table fitted (2 where its two-difference
    coefficients use the second term anywhere, else 1). ``2`` with a table that has no
    two-difference coefficients is an error."""

    def __post_init__(self) -> None:
        def coerce(name: str, enum_type: type[enum.Enum]) -> None:
            value = getattr(self, name)
            if isinstance(value, enum_type):
                return
            try:
                object.__setattr__(self, name, enum_type(value))
            except ValueError:
                valid = ", ".join(repr(m.value) for m in enum_type)  # type: ignore[attr-defined]
                raise ValueError(f"{name} must be one of {valid}, but got {value!r}") from None

        coerce("granularity", Granularity)
        coerce("prediction", Prediction)
        coerce("compiler", InnerCompiler)
        coerce("fallback", Fallback)
        coerce("change_points", ChangePoints)
        coerce("statistic", Statistic)
        self._check_int("max_cache_bytes", 1, "a positive int (bytes) or None")
        if self.coefficients is not None:
            coerce("coefficients", Coefficients)
            if self.coefficients is Coefficients.FITTED and isinstance(self.alpha, str) and self.alpha == "ones":
                raise ValueError("coefficients='fitted' needs a calibrated α table, but alpha='ones' was given")
        self._check_int("full_steps", 2, "an int >= 2 (the first two steps are always full) or None")
        if self.speedup is not None and (
            isinstance(self.speedup, bool) or not isinstance(self.speedup, int | float) or not self.speedup >= 1.0
        ):
            raise ValueError(f"speedup must be a number >= 1 or None, but got {self.speedup!r}")
        if (
            isinstance(self.propagation, bool)
            or not isinstance(self.propagation, int | float)
            or not (0.0 <= self.propagation < float("inf"))
        ):
            raise ValueError(f"propagation must be a finite number >= 0, but got {self.propagation!r}")
        if self.schedule is not None:
            coerce("schedule", Schedule)
        if self.schedule is Schedule.PLANNED and isinstance(self.alpha, str) and self.alpha == "ones":
            raise ValueError(
                "schedule='planned' runs the α table's stored end-to-end plans, but alpha='ones' was given: pass a "
                "table calibrated with sc_compile.calibrate(..., plan_samples=2) or drop schedule"
            )
        schedules = [
            name for name in ("full_steps", "speedup", "static_interval", "schedule") if getattr(self, name) is not None
        ]
        if len(schedules) > 1:
            raise ValueError(f"{' and '.join(schedules)} each choose the schedule: give at most one of them")
        coerce("stochastic_sampler", StochasticSampler)
        if self.predictor_order is not None and (
            not is_int_at_least(self.predictor_order, 1) or self.predictor_order > 2
        ):
            raise ValueError(f"predictor_order must be 1, 2 or None, but got {self.predictor_order!r}")
        if self.predictor_order == 2 and isinstance(self.alpha, str) and self.alpha == "ones":
            raise ValueError(
                "predictor_order=2 needs a table with two-difference coefficients, but alpha='ones' was given"
            )
        if self.predictor_order == 2 and self.coefficients is Coefficients.CHAINED:
            raise ValueError(
                "predictor_order=2 reads the fitted two-difference coefficients: not with coefficients='chained'"
            )
        self._check_int("static_interval", 1, "a positive int or None")
        self._check_int("warmup_steps", None, "an int or None")
        if self.warmup_steps is not None:
            if self.warmup_steps < MIN_WARMUP_STEPS:
                raise ValueError(
                    f"warmup_steps must be at least {MIN_WARMUP_STEPS} (the first difference needs two "
                    f"full steps), but got {self.warmup_steps}"
                )
        self._check_int("final_full_steps", 0, "an int >= 0", optional=False)
        self._check_int("num_inference_steps", 1, "a positive int or None")
        if not isinstance(self.share_decision_across_streams, bool):
            raise ValueError(
                f"share_decision_across_streams must be a bool, but got {self.share_decision_across_streams!r}"
            )
        if self.cache_dtype is not None and not (
            isinstance(self.cache_dtype, torch.dtype) and self.cache_dtype.is_floating_point
        ):
            raise ValueError(f"cache_dtype must be a floating torch.dtype or None, but got {self.cache_dtype!r}")
        self._check_alpha()

    def _check_int(self, name: str, minimum: int | None, requirement: str, *, optional: bool = True) -> None:
        """The one int check of the options: ``name`` is an int (not a bool) of at least ``minimum``,
        or ``None`` when ``optional``; else ``ValueError("<name> must be <requirement>, but got ...")``."""
        value = getattr(self, name)
        if value is None and optional:
            return
        if not is_int_at_least(value, minimum):
            raise ValueError(f"{name} must be {requirement}, but got {value!r}")

    def _check_alpha(self) -> None:
        from sc_compile.calibration.table import AlphaTable

        alpha = self.alpha
        if alpha is None or isinstance(alpha, AlphaTable):
            return
        if isinstance(alpha, str) and alpha == "ones":
            return
        if isinstance(alpha, str | os.PathLike):
            if not os.path.isfile(alpha):
                raise ValueError(
                    f"alpha must be 'ones', an AlphaTable or the path of an α file, but {os.fspath(alpha)!r} "
                    "is not a file. Write one with `python -m sc_compile calibrate ...`."
                )
            return
        raise ValueError(f"alpha must be 'ones', an AlphaTable, a path or None, but got {type(alpha).__name__}")

    @property
    def planned_default(self) -> bool:
        """Whether the schedule is the stored plan's default (``schedule`` or the default, see
        :data:`DEFAULT_SCHEDULE`) rather than a budget, a static interval or the dynamic rule."""
        if self.budgeted or self.static_interval is not None:
            return False
        return (self.schedule or DEFAULT_SCHEDULE) is Schedule.PLANNED

    @property
    def budgeted(self) -> bool:
        """Whether the schedule is a budget (``full_steps`` or ``speedup``)."""
        return self.full_steps is not None or self.speedup is not None

    def budget_for(self, num_steps: int) -> int:
        """The number of full steps of a budgeted ``num_steps``-step generation."""
        if self.full_steps is not None:
            return self.full_steps
        assert self.speedup is not None
        return max(MIN_WARMUP_STEPS, min(num_steps, round(num_steps / self.speedup)))

    def warmup_for(self, num_steps: int | None) -> int:
        """S_f for a generation of ``num_steps`` steps (``None``: unknown)."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        if num_steps is None or num_steps >= REFERENCE_NUM_STEPS:
            return REFERENCE_WARMUP_STEPS
        return max(MIN_WARMUP_STEPS, round(REFERENCE_WARMUP_STEPS * num_steps / REFERENCE_NUM_STEPS))

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    # -- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-able data, versioned: ``{"_type", "_version", "_data"}`` (torchao's
        config serialisation). Enums are their values, ``cache_dtype`` its name (``"torch.bfloat16"``),
        an α path a string. An in-memory :class:`~sc_compile.calibration.table.AlphaTable` is
        recorded by what identifies it (``{"_type": "AlphaTable", ...}``); :meth:`from_dict` refuses
        it: save the table and pass its path to get a config that round-trips."""
        data: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, torch.dtype):
                value = str(value)
            elif isinstance(value, os.PathLike):
                value = os.fspath(value)
            elif field.name == "alpha" and value is not None and not isinstance(value, str):
                value = {
                    "_type": "AlphaTable",
                    "model_class": value.model_class,
                    "fingerprint": value.fingerprint,
                    "granularity": value.granularity,
                    "num_steps": value.num_steps,
                    "command": value.command,
                }
            data[field.name] = value
        return {"_type": type(self).__name__, "_version": CONFIG_VERSION, "_data": data}

    @classmethod
    def from_dict(cls, serialized: Mapping[str, Any]) -> ScalingCacheConfig:
        """The config :meth:`to_dict` wrote. Raises ``ValueError`` for another type, a version this
        sc_compile does not read, an unknown option or an in-memory α table."""
        if not isinstance(serialized, Mapping) or set(serialized) != {"_type", "_version", "_data"}:
            raise ValueError(
                "a serialised ScalingCacheConfig is a dict with the keys '_type', '_version' and '_data' "
                f"(ScalingCacheConfig.to_dict()), but got {serialized!r}"
            )
        if serialized["_type"] != cls.__name__:
            raise ValueError(f"expected a serialised {cls.__name__}, but '_type' is {serialized['_type']!r}")
        version = serialized["_version"]
        if version not in READABLE_CONFIG_VERSIONS:
            raise ValueError(
                f"{cls.__name__} version {version!r} was written by another sc_compile; this one reads versions "
                f"{list(READABLE_CONFIG_VERSIONS)}. Upgrade sc_compile, or write the config again with this version."
            )
        data = dict(serialized["_data"])
        unknown = sorted(set(data) - set(cls.option_names()))
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} in a serialised {cls.__name__}; valid: {list(cls.option_names())}"
            )
        alpha = data.get("alpha")
        if isinstance(alpha, Mapping):
            raise ValueError(
                f"this config was made with an in-memory α table ({dict(alpha)}), which is not serialised: "
                "save the table (AlphaTable.save) and give its path as alpha"
            )
        dtype = data.get("cache_dtype")
        if dtype is not None:
            found = getattr(torch, str(dtype).removeprefix("torch."), None)
            if not isinstance(found, torch.dtype):
                raise ValueError(f"cache_dtype {dtype!r} is not a torch dtype")
            data["cache_dtype"] = found
        return cls(**data)


def split_options(
    options: Mapping[str, Any] | None, mode: str | None = None
) -> tuple[ScalingCacheConfig, dict[str, Any]]:
    """Split ``torch.compile`` options into our config and Inductor config patches.

    Raises ``ValueError`` naming an unknown key and the valid ones.
    """
    options = dict(options or {})
    ours = {k: options.pop(k) for k in list(options) if k in ScalingCacheConfig.option_names()}
    inductor_names = set(torch._inductor.list_options())
    unknown = sorted(k for k in options if k not in inductor_names)
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for backend 'scalingcache'. ScalingCache options are "
            f"{list(ScalingCacheConfig.option_names())}; any other key must be an Inductor option "
            "(torch._inductor.list_options())."
        )
    config = ScalingCacheConfig(**ours)
    patches: dict[str, Any] = {}
    if mode is not None and mode != "default":
        modes = torch._inductor.list_mode_options()
        if mode not in modes:
            raise ValueError(f"unknown mode {mode!r}; valid modes are {sorted(modes)}")
        patches.update(torch._inductor.list_mode_options(mode))
    patches.update(options)
    if patches and config.compiler is not InnerCompiler.INDUCTOR:
        raise ValueError(
            f"Inductor options or mode {sorted(patches)} were given but compiler={config.compiler.value!r}; "
            "drop them or use compiler='inductor'."
        )
    return config, patches
