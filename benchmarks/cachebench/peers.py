"""Every method the benchmark runs, as data: one frozen dataclass per method, one instance per
configuration (setting and variant), one interface.

``prepare(harness)`` builds the configuration's pipeline on a fresh copy of the transformer and says
how it is counted (a ``LinearCounter`` for eager runs; a record to keep after each batch of the
measured generation); ``read_records(result, records, harness)`` turns those records into
measurements. ``configurations(settings, ...)`` lists the configurations of a run, in the order they
run and are reported.
"""

from __future__ import annotations

import abc
import ast
import contextlib
import dataclasses
import io
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from .measurements import LinearCounter, Result, counts_from_reports

if TYPE_CHECKING:
    from .harness import Harness
    from .settings import Settings


@dataclasses.dataclass
class Prepared:
    """A configuration built and ready to generate."""

    pipe: Any
    linear_counter: LinearCounter | None = None  # eager runs: block-Linear MACs per call
    record_batch: Callable[[Any], Any] | None = None  # pipe -> what to keep after each batch


@dataclasses.dataclass(frozen=True, kw_only=True)
class Method(abc.ABC):
    """One configuration of one method."""

    kind: ClassVar[str] = "peer"  # "uncached" | "ours" | "peer"

    @property
    @abc.abstractmethod
    def label(self) -> str:
        """The method: one curve of the plot."""

    @property
    @abc.abstractmethod
    def param(self) -> str:
        """The setting within the method's sweep."""

    @property
    @abc.abstractmethod
    def variant(self) -> str:
        """How it runs: "eager", "inductor", "eager inner", "compiled (<backend>)"."""

    @property
    def name(self) -> str:
        return f"{self.label} {self.param}"

    @property
    def key(self) -> str:
        return f"{self.name}|{self.variant}"

    @property
    def twin(self) -> str | None:
        """The key of the eager twin whose counts a compiled run takes (None: counted itself)."""
        return None

    @abc.abstractmethod
    def prepare(self, harness: Harness) -> Prepared: ...

    def read_records(self, result: Result, records: list[Any], harness: Harness) -> None:
        """Measurements from the records ``Prepared.record_batch`` kept (one per batch); a method
        that keeps records must read them."""
        if records:
            raise TypeError(f"{type(self).__name__} kept {len(records)} records but reads none")


def _compiled_variant(backend: str | None) -> str:
    if backend is None:
        return "eager"
    return "inductor" if backend == "inductor" else f"compiled ({backend})"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Uncached(Method):
    """The reference: every step in full, eager (fidelity) or under ``torch.compile`` (speed-ups)."""

    kind: ClassVar[str] = "uncached"
    backend: str | None = None  # None: eager

    label = "uncached"  # type: ignore[assignment]
    param = "-"  # type: ignore[assignment]

    @property
    def name(self) -> str:
        return "uncached"

    @property
    def variant(self) -> str:
        return _compiled_variant(self.backend)

    @property
    def twin(self) -> str | None:
        return None if self.backend is None else "uncached|eager"

    def prepare(self, harness: Harness) -> Prepared:
        transformer, counter = harness.fresh_transformer(counting=self.backend is None)
        pipe = harness.pipeline(transformer)
        if self.backend is not None:
            pipe.transformer = harness.compile_uncached(transformer, self.backend)
        return Prepared(pipe, counter)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScalingCache(Method):
    """Ours, ``backend="scalingcache"``: the dynamic schedule, or one of its options (static
    interval, budget, residual prediction, module granularity)."""

    kind: ClassVar[str] = "ours"
    warmup_steps: int | None
    compiler: str  # inner compiler
    alpha: str | None  # None: the table shipped for the layout
    num_inference_steps: int
    granularity: str = "block"
    static_interval: int | None = None
    prediction: str = "hidden"
    full_steps: int | None = None

    @property
    def label(self) -> str:
        if self.granularity == "module":
            return "ScalingCache module"
        if self.static_interval is not None:
            return "ScalingCache static"
        if self.full_steps is not None:
            return "ScalingCache budget"
        if self.prediction == "residual":
            return "ScalingCache residual"
        return "ScalingCache"

    @property
    def param(self) -> str:
        if self.static_interval is not None:
            return f"S={self.warmup_steps} k={self.static_interval}"
        if self.full_steps is not None:
            return f"B={self.full_steps}"
        return f"S={self.warmup_steps}"

    @property
    def name(self) -> str:
        if self.static_interval is not None:
            return f"{self.label} k={self.static_interval}"
        return f"{self.label} {self.param}"

    @property
    def variant(self) -> str:
        return {"eager": "eager inner"}.get(self.compiler, self.compiler)

    def prepare(self, harness: Harness) -> Prepared:
        import torch

        import sc_compile

        transformer, _ = harness.fresh_transformer(counting=False)
        pipe = harness.pipeline(transformer)
        options = {
            "warmup_steps": self.warmup_steps,
            "alpha": self.alpha,
            "granularity": self.granularity,
            "compiler": self.compiler,
            "num_inference_steps": self.num_inference_steps,
            "static_interval": self.static_interval,
            "prediction": self.prediction,
            "full_steps": self.full_steps,
        }
        compiled = torch.compile(transformer, backend="scalingcache", options=options)
        pipe.transformer = compiled
        return Prepared(pipe, record_batch=lambda _pipe: sc_compile.report(compiled))

    def read_records(self, result: Result, records: list[Any], harness: Harness) -> None:
        counts_from_reports(result, records, harness.calls_per_generation, len(harness.batches))


# --------------------------------------------------------------------------- peers


@dataclasses.dataclass(frozen=True, kw_only=True)
class Peer(Method):
    """Another cache. ``backend``: None runs it eager (counted by its Linears), else under
    ``torch.compile`` with that backend (counted by its eager twin)."""

    backend: str | None = None
    compilable: ClassVar[bool] = True  # whether a sweep's middle point also runs compiled

    @property
    def variant(self) -> str:
        return _compiled_variant(self.backend)

    @property
    def twin(self) -> str | None:
        return None if self.backend is None else f"{self.name}|eager"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiffusersPeer(Peer):
    """A diffusers hook cache, installed by ``transformer.enable_cache(config)``."""

    @abc.abstractmethod
    def cache_config(self, pipe: Any) -> Any: ...

    def prepare(self, harness: Harness) -> Prepared:
        transformer, counter = harness.fresh_transformer(counting=self.backend is None)
        pipe = harness.pipeline(transformer)
        transformer.enable_cache(self.cache_config(pipe))
        if self.backend is not None:
            pipe.transformer = harness.compile_uncached(transformer, self.backend)
        return Prepared(pipe, counter)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FirstBlockCache(DiffusersPeer):
    label = "FirstBlockCache"  # type: ignore[assignment]
    threshold: float

    @property
    def param(self) -> str:
        return f"thr={self.threshold:g}"

    def cache_config(self, pipe: Any) -> Any:
        from diffusers.hooks import FirstBlockCacheConfig

        return FirstBlockCacheConfig(threshold=self.threshold)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaylorSeerCache(DiffusersPeer):
    """Caches attention outputs (Taylor order ``max_order``, fp32 factors), after ``warmup_steps`` full steps."""

    label = "TaylorSeerCache"  # type: ignore[assignment]
    interval: int
    warmup_steps: int
    max_order: int = 1
    # diffusers' default patterns (``^blocks.*attn`` ...) must match a module name in full, so
    # Wan's ``blocks.0.attn1`` / ``attn2`` are never hooked: ``configurations`` passes the pattern
    # the default intends on models whose attention modules carry a number.
    cache_identifiers: tuple[str, ...] | None = None

    @property
    def param(self) -> str:
        return f"interval={self.interval}" + ("" if self.max_order == 1 else f" order={self.max_order}")

    def options(self) -> dict[str, Any]:
        identifiers = None if self.cache_identifiers is None else list(self.cache_identifiers)
        return {"cache_identifiers": identifiers}

    def cache_config(self, pipe: Any) -> Any:
        import torch
        from diffusers.hooks import TaylorSeerCacheConfig

        return TaylorSeerCacheConfig(
            cache_interval=self.interval,
            disable_cache_before_step=self.warmup_steps,
            max_order=self.max_order,
            taylor_factors_dtype=torch.float32,
            **self.options(),
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaylorSeerCacheLite(TaylorSeerCache):
    """Every block skipped, the output projection predicted (whole-model caching, like ours)."""

    label = "TaylorSeerCache lite"  # type: ignore[assignment]

    def options(self) -> dict[str, Any]:
        return {"use_lite_mode": True}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MagCache(DiffusersPeer):
    """With the magnitude ratios of its own calibration mode (``calibrate_magcache``)."""

    label = "MagCache"  # type: ignore[assignment]
    threshold: float
    max_skip_steps: int
    num_inference_steps: int
    mag_ratios: tuple[float, ...]
    retention_ratio: float = 0.2  # the first steps always run in full

    @property
    def param(self) -> str:
        return f"thr={self.threshold:g}"

    def cache_config(self, pipe: Any) -> Any:
        from diffusers.hooks import MagCacheConfig

        return MagCacheConfig(
            threshold=self.threshold,
            max_skip_steps=self.max_skip_steps,
            retention_ratio=self.retention_ratio,
            num_inference_steps=self.num_inference_steps,
            mag_ratios=list(self.mag_ratios),
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class PyramidAttentionBroadcast(DiffusersPeer):
    label = "PyramidAttentionBroadcast"  # type: ignore[assignment]
    skip: int  # spatial attention block skip range

    @property
    def param(self) -> str:
        return f"skip={self.skip}"

    def cache_config(self, pipe: Any) -> Any:
        from diffusers.hooks import PyramidAttentionBroadcastConfig

        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=self.skip,
            spatial_attention_timestep_skip_range=(100, 800),
            current_timestep_callback=lambda: pipe.current_timestep,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class FasterCache(DiffusersPeer):
    label = "FasterCache"  # type: ignore[assignment]
    skip: int  # spatial attention block skip range

    @property
    def param(self) -> str:
        return f"skip={self.skip}"

    def cache_config(self, pipe: Any) -> Any:
        from diffusers.hooks import FasterCacheConfig

        return FasterCacheConfig(
            spatial_attention_block_skip_range=self.skip,
            spatial_attention_timestep_skip_range=(-1, 681),
            current_timestep_callback=lambda: pipe.current_timestep,
            attention_weight_callback=lambda _: 0.3,
            is_guidance_distilled=True,  # guidance runs as separate calls, not batched
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class SeaCache(DiffusersPeer):
    """Never compiled: ``FluxPipeline``'s ``cache_context()`` passes no step_index / sigma, so on
    Flux it runs fail-open (every step in full) and there is nothing to compare compiled."""

    label = "SeaCache"  # type: ignore[assignment]
    compilable: ClassVar[bool] = False
    threshold: float

    @property
    def param(self) -> str:
        return f"thr={self.threshold:g}"

    def cache_config(self, pipe: Any) -> Any:
        from diffusers.hooks import SeaCacheConfig

        return SeaCacheConfig(threshold=self.threshold)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DBCache(Peer):
    """cache-dit's DBCache (F``front``B``back``), installed on the pipeline."""

    label = "cache-dit DBCache"  # type: ignore[assignment]
    threshold: float  # residual-diff threshold
    front_blocks: int  # Fn_compute_blocks
    back_blocks: int  # Bn_compute_blocks
    warmup_steps: int
    num_inference_steps: int
    separate_cfg: bool = True  # False where the pipeline batches cond and uncond in one call
    taylorseer: ClassVar[bool] = False

    @property
    def param(self) -> str:
        return f"F{self.front_blocks}B{self.back_blocks} rdt={self.threshold:g}"

    def prepare(self, harness: Harness) -> Prepared:
        import cache_dit

        transformer, counter = harness.fresh_transformer(counting=self.backend is None)
        pipe = harness.pipeline(transformer, isolate_class=True)
        config = cache_dit.DBCacheConfig(
            Fn_compute_blocks=self.front_blocks,
            Bn_compute_blocks=self.back_blocks,
            residual_diff_threshold=self.threshold,
            max_warmup_steps=self.warmup_steps,
            num_inference_steps=self.num_inference_steps,
            enable_separate_cfg=self.separate_cfg,
        )
        calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1) if self.taylorseer else None
        with contextlib.redirect_stdout(io.StringIO()):
            cache_dit.enable_cache(pipe, cache_config=config, calibrator_config=calibrator)
        if self.backend is not None:
            pipe.transformer = harness.compile_uncached(transformer, self.backend)

        def record(p: Any) -> Any:
            with contextlib.redirect_stdout(io.StringIO()):
                summary = cache_dit.summary(p, logging=False)
            return [(len(x.cached_steps), len(x.cfg_cached_steps)) for x in summary]

        return Prepared(pipe, counter, record)

    def read_records(self, result: Result, records: list[Any], harness: Harness) -> None:
        result.extra["cachedit_cached_steps"] = records


@dataclasses.dataclass(frozen=True, kw_only=True)
class DBCacheTaylorSeer(DBCache):
    """DBCache with cache-dit's first-order TaylorSeer calibrator."""

    label = "cache-dit DBCache+TaylorSeer"  # type: ignore[assignment]
    taylorseer: ClassVar[bool] = True


# --------------------------------------------------------------------------- MagCache's calibration


def calibrate_magcache(harness: Harness) -> tuple[list[float], dict[str, Any]]:
    """MagCache's own calibration mode, run once on the first batch: ``(ratios, record)``.

    It prints one list of ratios per cache context (cond first, then uncond); MagCache takes one
    table: the cond one.
    """
    import torch
    from diffusers.hooks import MagCacheConfig

    transformer, _ = harness.fresh_transformer(counting=False)
    pipe = harness.pipeline(transformer)
    transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=harness.settings.steps))
    printed = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(printed):
        generator = torch.Generator().manual_seed(harness.settings.seed)
        harness.generate_batch(pipe, harness.batches[0], generator)
    lists = [ast.literal_eval(m) for m in re.findall(r"^\[.*\]$", printed.getvalue(), flags=re.M)]
    if not lists:
        raise RuntimeError(f"MagCache calibration printed no ratios: {printed.getvalue()[:500]!r}")
    return lists[0], {"lists": lists, "seconds": time.perf_counter() - started, "used": "cond (first context)"}


# --------------------------------------------------------------------------- the sweep


def taylorseer_identifiers(module_names: list[str]) -> tuple[str, ...] | None:
    """``TaylorSeerCache.cache_identifiers`` for a model with these module names: the attention
    pattern diffusers' default intends where attention modules carry a number (Wan's
    ``blocks.0.attn1``), else None (diffusers' default)."""
    if any(re.fullmatch(r"blocks\.\d+\.attn\d+", n) for n in module_names):
        return (r"^blocks\.\d+\.attn\d+$",)
    return None


def configurations(settings: Settings, module_names: list[str], mag_ratios: list[float] | None) -> list[Method]:
    """The configurations of a run, in order: the uncached references, ours, then each peer's sweep
    (eager, and compiled where ``Sweeps.compiles``). ``mag_ratios=None`` leaves MagCache out (its
    calibration failed)."""
    sweeps = settings.sweeps
    steps = settings.steps
    alpha = None if settings.alpha == "auto" else settings.alpha
    configs: list[Method] = [Uncached(), Uncached(backend=settings.peer_backend)]

    # ScalingCache (ours)
    def ours(warmup: int | None, compiler: str, **options: Any) -> ScalingCache:
        return ScalingCache(warmup_steps=warmup, compiler=compiler, alpha=alpha, num_inference_steps=steps, **options)

    compilers = list(dict.fromkeys([settings.ours_compiler] + (["eager"] if sweeps.ours_eager_variant else [])))
    configs += [ours(s, settings.ours_compiler) for s in sweeps.warmups]
    if sweeps.ours_eager_variant:
        configs += [ours(s, "eager") for s in sweeps.warmups]
    # The static-interval schedule (an option of ours, the paper's baseline): reaches full-step
    # counts below what the dynamic rule chooses, to compare with peers there.
    configs += [ours(sweeps.static_warmup, c, static_interval=k) for k in sweeps.static_intervals for c in compilers]
    # The budgeted schedule: exactly B full steps, placed by the calibrated errors (default
    # warm-up, shortened where the budget needs it).
    configs += [ours(None, c, full_steps=b) for b in sweeps.budgets for c in compilers]
    # prediction="residual", with the α table of that layout when one is shipped.
    configs += [ours(s, c, prediction="residual") for s in sweeps.residual_warmups for c in compilers]
    configs += [ours(s, settings.ours_compiler, granularity="module") for s in sweeps.module_warmups]

    # The peers: one sweep each over one field, the other fields fixed.
    taylorseer = dict(warmup_steps=sweeps.ts_warmup)
    dbcache = dict(
        front_blocks=sweeps.dbc_fn, back_blocks=sweeps.dbc_bn, warmup_steps=sweeps.dbc_warmup, num_inference_steps=steps
    )
    peer_sweeps: list[tuple[type[Peer], str, tuple[Any, ...], dict[str, Any]]] = [
        (FirstBlockCache, "threshold", sweeps.fbc, {}),
        (
            TaylorSeerCache,
            "interval",
            sweeps.taylorseer,
            dict(taylorseer, cache_identifiers=taylorseer_identifiers(module_names)),
        ),
        (TaylorSeerCacheLite, "interval", sweeps.taylorseer_lite, taylorseer),
        (
            MagCache,
            "threshold",
            sweeps.magcache if mag_ratios is not None else (),
            dict(max_skip_steps=sweeps.mag_max_skip, num_inference_steps=steps, mag_ratios=tuple(mag_ratios or ())),
        ),
        (PyramidAttentionBroadcast, "skip", sweeps.pab, {}),
        (FasterCache, "skip", sweeps.fastercache, {}),
        (SeaCache, "threshold", sweeps.seacache, {}),
        (DBCache, "threshold", sweeps.dbcache, dbcache),
        (DBCacheTaylorSeer, "threshold", sweeps.dbcache_ts, dbcache),
    ]
    for method, field, values, fixed in peer_sweeps:
        for i, value in enumerate(values):
            eager = method(**{field: value}, **fixed)
            configs.append(eager)
            if method.compilable and sweeps.compiles(i, len(values)):
                configs.append(dataclasses.replace(eager, backend=settings.peer_backend))
    if sweeps.only:
        pattern = re.compile(sweeps.only)
        configs = [c for c in configs if c.kind == "uncached" or pattern.search(f"{c.name} {c.variant}")]
    return configs
