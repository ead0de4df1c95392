"""``sc-compile`` / ``python -m sc_compile``: demo, calibrate, inspect."""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The transformer classes whose demo-style directories the CLI builds pipelines for.
DEMO_CLASSES = ("FluxTransformer2DModel", "WanTransformer3DModel", "SD3Transformer2DModel")
DEMO_EXTRA = 'pip install "sc-compile[demo]"'
DEFAULT_DEMO_REPEATS = 3
THREADS_HELP = "CPU threads torch uses (default: torch's default, which OMP_NUM_THREADS sets)"
PIPELINE_INDEX = "model_index.json"
DEMO_EMBEDDINGS = "class_embeddings.safetensors"
# α is fitted from the step-to-step changes of two steps before: steps 0 and 1 hold α = 1.
MIN_CALIBRATION_STEPS = 3
# The values of the config's enums (Granularity, Prediction, Statistic, InnerCompiler), written
# here so that `--help` does not import torch; tests/test_cli.py checks they are the enums' values.
# The commands turn them into the enums at once.
GRANULARITY_CHOICES = ("block", "module")
PREDICTION_CHOICES = ("hidden", "residual")
STATISTIC_CHOICES = ("subsample", "full")
COMPILER_CHOICES = ("inductor", "aot_eager", "eager")
MODEL_DIR_FORMATS = (
    f"a pipeline directory written by DiffusionPipeline.save_pretrained (with {PIPELINE_INDEX}), or a "
    f"demo-style transformer directory (config.json of {' / '.join(DEMO_CLASSES)} and {DEMO_EMBEDDINGS}, "
    "the format of the shipped demo models)"
)


def _command_line() -> str:
    return "python -m sc_compile " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _at_least(minimum: int, why: str = "") -> Callable[[str], int]:
    """An argparse type: an integer ``>= minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, but got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}{why}, but got {value}")
        return value

    return parse


def model_dir_format(model_dir: str | Path) -> str:
    """``"pipeline"`` or ``"demo"`` for a directory ``calibrate`` accepts; ``SystemExit`` otherwise."""
    directory = Path(model_dir)
    if not directory.exists():
        raise SystemExit(f"calibrate: {directory} does not exist; give {MODEL_DIR_FORMATS}")
    if not directory.is_dir():
        raise SystemExit(f"calibrate: {directory} is not a directory; give {MODEL_DIR_FORMATS}")
    if (directory / PIPELINE_INDEX).is_file():
        index = json.loads((directory / PIPELINE_INDEX).read_text())
        transformer = index.get("transformer")
        if not isinstance(transformer, list) or transformer[0] is None:
            raise SystemExit(
                f"calibrate: the pipeline in {directory} has no transformer component ({PIPELINE_INDEX} lists "
                f"{', '.join(sorted(k for k in index if not k.startswith('_')))}); ScalingCache caches a pipeline's "
                "diffusion transformer (pipe.transformer)"
            )
        return "pipeline"
    config_path = directory / "config.json"
    if config_path.is_file():
        class_name = json.loads(config_path.read_text()).get("_class_name")
        if class_name not in DEMO_CLASSES:
            raise SystemExit(
                f"calibrate: {directory} holds a {class_name} alone, without a pipeline around it; save the whole "
                f"pipeline with pipe.save_pretrained(DIR) and calibrate DIR (give {MODEL_DIR_FORMATS})"
            )
        if not (directory / DEMO_EMBEDDINGS).is_file():
            raise SystemExit(
                f"calibrate: {directory} is a {class_name} directory without {DEMO_EMBEDDINGS}; give "
                f"{MODEL_DIR_FORMATS}"
            )
        return "demo"
    raise SystemExit(f"calibrate: {directory} has neither {PIPELINE_INDEX} nor config.json; give {MODEL_DIR_FORMATS}")


def check_writable_output(path: str | Path) -> Path:
    """``path`` as a file that can be written, checked by opening it; ``SystemExit`` otherwise.

    A file the probe creates is removed again, so a calibration that fails leaves nothing behind.
    """
    out = Path(path)
    if out.is_dir():
        raise SystemExit(f"calibrate: --out {out} is a directory; give a file path such as {out / 'alpha.safetensors'}")
    if out.parent.exists() and not out.parent.is_dir():
        raise SystemExit(f"calibrate: --out {out}: {out.parent} is a file, not a directory; choose another path")
    if not out.parent.is_dir():
        raise SystemExit(
            f"calibrate: --out {out}: the directory {out.parent} does not exist; create it or choose another path"
        )
    existed = out.exists()
    try:
        with open(out, "ab"):
            pass
    except OSError as error:
        raise SystemExit(
            f"calibrate: --out {out} cannot be written ({error.strerror}); choose a writable path"
        ) from error
    finally:
        if not existed:
            out.unlink(missing_ok=True)
    return out


def read_prompts(args: argparse.Namespace) -> list[str] | None:
    """The text prompts of ``--prompt`` and ``--prompts-file`` (one per non-empty line), if any."""
    prompts = list(args.prompt or [])
    if args.prompts_file is not None:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise SystemExit(
                f"calibrate: --prompts-file {path} is not a file; give a text file with one prompt per line"
            )
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise SystemExit(f"calibrate: --prompts-file {path} holds no prompt; write one prompt per line")
    return prompts or None


def read_prompt_embeddings(path: str | None) -> dict[str, Any] | None:
    """``--prompt-embeds``: a safetensors file of pipeline call arguments, one prompt per row.

    Each tensor is named as the pipeline's keyword argument (``prompt_embeds``,
    ``pooled_prompt_embeds``, ``negative_prompt_embeds``, ...) and all have the same first
    dimension, the number of prompts.
    """
    if path is None:
        return None
    file = Path(path)
    if not file.is_file():
        raise SystemExit(
            f"calibrate: --prompt-embeds {file} is not a file; give a .safetensors file of prompt embeddings"
        )
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(file))
    except SafetensorError as error:
        raise SystemExit(f"calibrate: --prompt-embeds {file} is not a safetensors file ({error})") from error
    if "prompt_embeds" not in tensors:
        raise SystemExit(
            f"calibrate: --prompt-embeds {file} has no tensor named prompt_embeds (it has "
            f"{', '.join(sorted(tensors)) or 'none'}); "
            "name each tensor as the pipeline argument it is, e.g. prompt_embeds [N, T, D]"
        )
    counts = {name: (tensor.shape[0] if tensor.dim() else 0) for name, tensor in tensors.items()}
    if len(set(counts.values())) != 1 or counts["prompt_embeds"] < 1:
        raise SystemExit(
            f"calibrate: --prompt-embeds {file}: every tensor needs the same first dimension >= 1, the number of "
            f"prompts; got {counts}"
        )
    return tensors


def calibration_samples(
    args: argparse.Namespace, prompts: list[str] | None, embeddings: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """One keyword-argument dict per generation: every prompt (or embeddings row) x ``--seeds``."""
    common: dict[str, Any] = {"num_inference_steps": args.steps, "output_type": "latent"}
    for name in ("height", "width", "num_frames", "guidance_scale"):
        if getattr(args, name) is not None:
            common[name] = getattr(args, name)
    per_prompt: list[dict[str, Any]]
    if embeddings is not None:
        count = next(iter(embeddings.values())).shape[0]
        per_prompt = [{name: tensor[row : row + 1] for name, tensor in embeddings.items()} for row in range(count)]
    else:
        assert prompts is not None
        per_prompt = [{"prompt": prompt} for prompt in prompts]
    return [{**prompt, **common, "seed": 1000 + seed} for seed in range(args.seeds) for prompt in per_prompt]


def load_demo_style_pipeline(model_dir: str | Path) -> tuple[Any, Any, str]:
    """A transformer directory (``save_pretrained`` output plus class embeddings, the format of
    the shipped demo models) as a real diffusers pipeline: ``(pipeline, embeddings, class name)``."""
    from sc_compile.demo import models

    model_dir = Path(model_dir)
    class_name = json.loads((model_dir / "config.json").read_text())["_class_name"]
    loaders = {
        "FluxTransformer2DModel": models.load_flux_demo,
        "WanTransformer3DModel": models.load_wan_demo,
        "SD3Transformer2DModel": models.load_sd3_demo,
    }
    pipe: Any
    pipe, embeddings = loaders[class_name](path=model_dir)
    return pipe, embeddings, class_name


def _demo_samples(args: argparse.Namespace, embeddings: Any, class_name: str) -> list[dict[str, Any]]:
    from sc_compile.demo.sampling import demo_size

    guidance_scale = 3.0 if args.guidance_scale is None else args.guidance_scale
    return [
        {
            **embeddings.pipeline_kwargs([label], guidance_scale=guidance_scale),
            **demo_size(class_name),
            "num_inference_steps": args.steps,
            "seed": 1000 + seed,
            "output_type": "pt",
        }
        for seed in range(args.seeds)
        for label in range(args.classes)
    ]


def _check_call_arguments(pipe: Any, sample: dict[str, Any], model_dir: str) -> None:
    parameters = inspect.signature(type(pipe).__call__).parameters
    unknown = sorted(name for name in sample if name != "seed" and name not in parameters)
    if unknown:
        raise SystemExit(
            f"calibrate: {type(pipe).__name__} (from {model_dir}) takes no argument {', '.join(unknown)}; "
            f"name the tensors of --prompt-embeds after its arguments"
        )


def check_calibration_inputs(args: argparse.Namespace) -> tuple[str, Path, list[str] | None, dict[str, Any] | None]:
    """Everything ``calibrate`` can check without the model, checked before the model is loaded:
    ``(model directory format, output path, text prompts, prompt embeddings)``."""
    if args.finer_steps and args.finer_steps <= args.steps:
        raise SystemExit(
            f"calibrate: --finer-steps {args.finer_steps} must be more than --steps {args.steps} (or 0: no check)"
        )
    from sc_compile.calibration.collect import MIN_PLAN_STEPS

    if args.finer_steps and args.steps < MIN_PLAN_STEPS:
        raise SystemExit(
            f"calibrate: --finer-steps {args.finer_steps} checks the stored plans, but none are chosen at --steps "
            f"{args.steps} (fewer than {MIN_PLAN_STEPS}): drop --finer-steps"
        )
    if args.finer_steps and args.plan_samples == 0:
        raise SystemExit(
            f"calibrate: --finer-steps {args.finer_steps} checks the stored plans, but --plan-samples 0 stores none: "
            "drop one of them"
        )
    kind = model_dir_format(args.model_dir)
    out = check_writable_output(args.out)
    prompts = read_prompts(args)
    embeddings = read_prompt_embeddings(args.prompt_embeds)
    if kind == "demo" and (prompts is not None or embeddings is not None):
        raise SystemExit(
            f"calibrate: {args.model_dir} is a demo-style directory; its prompts are class labels (--classes), not "
            "--prompt / --prompt-embeds"
        )
    if kind == "pipeline":
        if prompts is not None and embeddings is not None:
            raise SystemExit("calibrate: give text prompts (--prompt / --prompts-file) or --prompt-embeds, not both")
        if prompts is None and embeddings is None:
            raise SystemExit(
                f"calibrate: the pipeline in {args.model_dir} needs prompts: --prompt TEXT, --prompts-file FILE or "
                "--prompt-embeds FILE"
            )
        if prompts is not None:
            index = json.loads((Path(args.model_dir) / PIPELINE_INDEX).read_text())
            encoders = [
                name
                for name, value in index.items()
                if name.startswith("text_encoder") and isinstance(value, list) and value[0] is not None
            ]
            if not encoders:
                raise SystemExit(
                    f"calibrate: the pipeline in {args.model_dir} has no text encoder to encode --prompt; give "
                    "--prompt-embeds FILE"
                )
    return kind, out, prompts, embeddings


def load_saved_pipeline(model_dir: str | Path) -> Any:
    """``DiffusionPipeline.from_pretrained`` of a directory ``save_pretrained`` wrote."""
    from diffusers import DiffusionPipeline

    # Components saved as absent ([null, null]: a pipeline built without text encoders, as
    # with prompt embeddings) must be passed as None, or diffusers refuses to load the rest.
    index = json.loads((Path(model_dir) / PIPELINE_INDEX).read_text())
    absent = {name: None for name, value in index.items() if isinstance(value, list) and value[0] is None}
    try:
        return DiffusionPipeline.from_pretrained(model_dir, **absent)
    except ValueError as error:
        # diffusers loads a model that keeps modules in float32 (Wan's transformer) only
        # through accelerate, and says so as "`low_cpu_mem_usage` cannot be False ...".
        if "low_cpu_mem_usage" in str(error) and importlib.util.find_spec("accelerate") is None:
            raise SystemExit(
                f"calibrate: diffusers cannot load the pipeline in {model_dir} without the accelerate "
                f"package ({error}); install it with `pip install accelerate` and run again"
            ) from error
        raise


def cmd_calibrate(args: argparse.Namespace) -> int:
    kind, out, prompts, embeddings = check_calibration_inputs(args)

    import sc_compile

    print(f"threads: {set_threads(args.threads)}", flush=True)
    if kind == "demo":
        require_demo_extra("calibrate")
        pipe, class_embeddings, class_name = load_demo_style_pipeline(args.model_dir)
        samples = _demo_samples(args, class_embeddings, class_name)
    else:
        pipe = load_saved_pipeline(args.model_dir)
        samples = calibration_samples(args, prompts, embeddings)
        _check_call_arguments(pipe, samples[0], args.model_dir)
    # One progress bar, calibration's own, instead of one per generation from the pipeline.
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    from sc_compile.config import Granularity, InnerCompiler, Prediction
    from sc_compile.contract import Statistic

    table = sc_compile.calibrate(
        pipe,
        samples,
        beta=args.beta,
        granularity=Granularity(args.granularity),
        prediction=Prediction(args.prediction),
        compiler=InnerCompiler(args.compiler),
        command=_command_line(),
        max_gap=args.max_gap,
        statistic=Statistic(args.statistic),
        plan_samples=args.plan_samples,
        plan_refine=args.plan_refine,
        second_order=args.second_order,
        finer_steps=args.finer_steps,
    )
    seconds = time.perf_counter() - start
    table.save(out)
    print(f"wrote {out}: {table!r}")
    print(f"calibration: {len(samples)} samples x {table.num_steps} steps in {seconds:.1f} s")
    return 0


def print_fitted(table: Any, previous_gap: int) -> None:
    """The per-gap coefficients the runtime multiplies (format-2 tables), for one previous gap."""
    fitted = table.fitted
    limit = fitted.max_gap_limit
    if not 1 <= previous_gap <= limit + 1:
        raise SystemExit(f"inspect: --previous-gap must be in 1..{limit + 1} for this table, but got {previous_gap}")
    print(
        f"fitted per-gap coefficients (what a cached step multiplies unless coefficients='chained'; K = {limit}):\n"
        f"a cached step k steps after the full step τ predicts y_τ + c·dy; c is the mean over the {table.num_points} "
        f"cache points, after a previous gap of {previous_gap} step(s) between full steps (--previous-gap G for "
        "others); K_τ is the longest gap served after τ; err is the relative squared error of the output's "
        "prediction"
    )
    print("step  K_τ   c at k = 1..K_τ" + " " * max(0, 7 * limit - 15) + "   err at k = 1..K_τ")
    for step in range(table.num_steps):
        served = int(fitted.max_gap[step])
        coefficients = fitted.coef[step, previous_gap - 1, :served].mean(dim=-1).tolist()
        errors = fitted.error[step, previous_gap - 1, :served].tolist()
        c_text = " ".join(f"{c:6.3g}" for c in coefficients)
        print(f"{step:4d}  {served:3d}  {c_text:<{7 * limit}}  " + " ".join(f"{e:.2g}" for e in errors))


def print_plans(plans: Any) -> None:
    """The schedules chosen end to end at calibration, one line each."""
    print(
        f"end-to-end plans (chosen on {plans.samples} rollout samples; calibrated error: 10·log10 of the output's "
        f"relative squared error; the dynamic rule: {plans.reference_error:.2f} dB at "
        f"{plans.reference_full_steps:.1f} full):"
    )
    print(" full  error dB  candidate / full steps")
    for index, count in enumerate(plans.counts()):
        print(f"{count:5d}  {float(plans.error[index]):8.2f}  {plans.source(index)}: {list(plans.steps(index))}")


def cmd_inspect(args: argparse.Namespace) -> int:
    from sc_compile.calibration.table import AlphaTable

    table = AlphaTable.load(args.file)
    print(repr(table))
    print(f"calibrated by: {table.command or '(not recorded)'}")
    mean, std = table.step_statistics()
    print("step  timestep      α mean   α std    α min    α max")
    for step in range(table.num_steps):
        row = table.alpha[step]
        timestep = f"{table.timesteps[step]:.5g}" if table.timesteps else "-"
        print(
            f"{step:4d}  {timestep:>10}  {mean[step]:7.4f}  {std[step]:7.4f}  {float(row.min()):7.4f}  "
            f"{float(row.max()):7.4f}"
        )
    if table.fitted is not None:
        print_fitted(table, args.previous_gap)
    if table.plans is not None:
        print_plans(table.plans)
    if table.finer is not None:
        check = table.finer
        print(f"finer grid: {check.describe()}")
        print(
            "  per rollout sample, dB (lower is better): table "
            + " / ".join(f"{e:.2f}" for e in check.table_errors)
            + ", α = 1 "
            + " / ".join(f"{e:.2f}" for e in check.ones_errors)
            + f"; full steps {list(check.full_steps)}"
        )
    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise SystemExit("--plot needs matplotlib: pip install 'sc-compile[plot]'") from None
        figure, axis = plt.subplots(figsize=(max(4, table.num_points * 0.5), max(3, table.num_steps * 0.2)))
        image = axis.imshow(table.alpha.numpy(), aspect="auto", cmap="viridis")
        axis.set_xlabel("cache point")
        axis.set_ylabel("step")
        axis.set_title(f"α, {table.model_class} ({table.granularity})")
        figure.colorbar(image, ax=axis)
        figure.tight_layout()
        figure.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")
    return 0


def require_demo_extra(command: str) -> None:
    """Exit with the install line of the ``[demo]`` extra where ``transformers`` is missing."""
    from sc_compile.demo import require_demo_extra as require

    try:
        require()
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] != "transformers":
            raise
        raise SystemExit(f"{command}: {error}") from error


def set_threads(threads: int | None) -> str:
    """Set torch's CPU thread count where ``--threads`` gives one; say what it is and why."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
        return f"{torch.get_num_threads()} (--threads)"
    return f"{torch.get_num_threads()} (torch's default; --threads N to change)"


def cmd_demo(args: argparse.Namespace) -> int:
    require_demo_extra("demo")
    from sc_compile.demo.main import run_demo

    # The thread count is set only when asked (--threads); the demo always says what it is.
    print(f"threads:        {set_threads(args.threads)}", flush=True)
    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sc-compile",
        description="ScalingCache: run the demo, calibrate an α table for a diffusers pipeline, inspect an α table.",
    )
    sub = parser.add_subparsers(dest="command", required=True, help="what to run (sc-compile COMMAND --help)")

    demo = sub.add_parser(
        "demo",
        help="uncached vs ScalingCache on the shipped trained demo model",
        description="Generate one sample per class with a shipped demo model, uncached and with ScalingCache, "
        "time both (compile excluded; interleaved repeats, median and range), and compare them (PSNR, SSIM, a "
        "picture). Needs the demo extra: " + DEMO_EXTRA + ".",
    )
    demo.add_argument(
        "--model", choices=["flux", "wan"], default="flux", help="the image (flux) or video (wan) demo model"
    )
    demo.add_argument("--steps", type=_at_least(1), default=None, help="inference steps (default: 28 flux, 20 wan)")
    demo.add_argument("--samples", type=_at_least(1), default=None, help="samples (default: 10 flux, 4 wan)")
    demo.add_argument(
        "--warmup-steps",
        type=_at_least(2),
        default=None,
        help="steps that always run in full first (default: 20%% of the steps, at least 2)",
    )
    demo.add_argument("--guidance-scale", type=float, default=3.0, help="classifier-free guidance scale (default: 3.0)")
    demo.add_argument(
        "--compiler",
        choices=COMPILER_CHOICES,
        default="inductor",
        help="the compiler of both runs (default: inductor; eager compiles in seconds but runs slower)",
    )
    demo.add_argument(
        "--repeats",
        type=_at_least(1),
        default=DEFAULT_DEMO_REPEATS,
        help=f"timed generations of each run after the first, interleaved (default: {DEFAULT_DEMO_REPEATS})",
    )
    demo.add_argument("--out", default="out/demo", help="output directory for the picture (default: out/demo)")
    demo.add_argument("--threads", type=_at_least(1), default=None, help=THREADS_HELP)
    demo.set_defaults(func=cmd_demo)

    cal = sub.add_parser(
        "calibrate",
        help="write an α table for a diffusers pipeline directory (or a demo-style model directory)",
        description="Calibrate an α table: run generations with every step full and fit α per step and cache "
        "point. MODEL_DIR is " + MODEL_DIR_FORMATS + ". A pipeline needs prompts: --prompt / --prompts-file "
        "(encoded by its text encoders) or --prompt-embeds; a demo-style directory uses its class labels.",
    )
    cal.add_argument(
        "model_dir", help="pipeline directory (DiffusionPipeline.save_pretrained) or demo-style model directory"
    )
    cal.add_argument("--out", required=True, help="the α file to write (.safetensors)")
    steps_note = " (α is fitted from the third step on)"
    cal.add_argument(
        "--steps", type=_at_least(MIN_CALIBRATION_STEPS, steps_note), default=28, help="inference steps per generation"
    )
    cal.add_argument("--prompt", action="append", help="a text prompt (repeat for several)")
    cal.add_argument("--prompts-file", help="a text file with one prompt per line")
    cal.add_argument(
        "--prompt-embeds",
        help="a .safetensors file of pipeline arguments, one prompt per row: prompt_embeds [N, T, D] and, as the "
        "pipeline takes them, pooled_prompt_embeds, negative_prompt_embeds, ...",
    )
    cal.add_argument("--seeds", type=_at_least(1), default=2, help="generations (seeds) per prompt or class")
    cal.add_argument(
        "--classes", type=_at_least(1), default=10, help="demo-style directories: class labels used as prompts"
    )
    cal.add_argument(
        "--height", type=_at_least(1), default=None, help="pipeline directories: image height (default: the pipeline's)"
    )
    cal.add_argument(
        "--width", type=_at_least(1), default=None, help="pipeline directories: image width (default: the pipeline's)"
    )
    cal.add_argument(
        "--num-frames",
        type=_at_least(1),
        default=None,
        help="pipeline directories: video frames (default: the pipeline's)",
    )
    cal.add_argument(
        "--guidance-scale", type=float, default=None, help="default: the pipeline's (3.0 for demo-style directories)"
    )
    cal.add_argument(
        "--beta",
        type=float,
        default=0.97,
        help="the moving-average factor over samples of the one-step α, as in the paper (default: 0.97)",
    )
    cal.add_argument(
        "--granularity",
        choices=GRANULARITY_CHOICES,
        default="block",
        help="cache points at block outputs or at every residual module (the compile option; default: block)",
    )
    cal.add_argument(
        "--prediction",
        choices=PREDICTION_CHOICES,
        default="hidden",
        help="predict the hidden state or the residual (the compile option; default: hidden)",
    )
    cal.add_argument(
        "--max-gap",
        type=_at_least(1),
        default=8,
        help="longest gap (steps) the fitted coefficients may serve; keeps 2K+2 values per cache point while "
        "calibrating",
    )
    cal.add_argument(
        "--plan-samples",
        type=_at_least(0),
        default=None,
        help="samples on which schedules are chosen end to end (each candidate run closed loop; the table stores the "
        "best per budget); 0: none (default: 2)",
    )
    cal.add_argument(
        "--second-order",
        action="store_true",
        help="also fit two-difference coefficients (a format-3 table; a cached step then keeps one more buffer per "
        "cache point); each stored plan is chosen with one or two differences, whichever its rollouts were better with",
    )
    cal.add_argument(
        "--finer-steps",
        type=_at_least(0),
        default=None,
        help="with stored plans, check the fitted coefficients at this many steps (more than --steps): where α = 1 "
        "beats them there on every rollout sample, generations of more steps than calibrated predict with α = 1, and "
        "where the planned default is worse there than the dynamic rule, the dynamic rule is their default; 0: no "
        "check (default: twice --steps, at least 9)",
    )
    cal.add_argument(
        "--plan-refine",
        type=_at_least(0),
        default=0,
        help="sweeps of local search after the candidate schedules (each full step moved by one step, kept where "
        "the closed loop is better); about 2B rollouts per budget of B full steps per sweep (default: 0)",
    )
    cal.add_argument(
        "--statistic",
        choices=STATISTIC_CHOICES,
        default="subsample",
        help="what the points no cached step reads keep (the compile option of that name)",
    )
    cal.add_argument(
        "--compiler",
        choices=COMPILER_CHOICES,
        default="eager",
        help="the compiler of the calibration runs (default: eager; the table does not depend on it)",
    )
    cal.add_argument("--threads", type=_at_least(1), default=None, help=THREADS_HELP)
    cal.set_defaults(func=cmd_calibrate)

    inspect = sub.add_parser("inspect", help="summarise an α file")
    inspect.add_argument("file", help="an α table (.safetensors) written by calibrate")
    inspect.add_argument(
        "--previous-gap",
        type=_at_least(1),
        default=1,
        help="fitted tables: show the coefficients after this many steps between the last two full steps (default: 1)",
    )
    inspect.add_argument("--plot", help="write a heat-map PNG of α over steps x points (needs matplotlib)")
    inspect.set_defaults(func=cmd_inspect)
    return parser


def quiet_third_party_notices() -> None:
    """Show only errors from diffusers' and transformers' own loggers on this CLI's console.

    Their notices at import and load time (a missing optional torchvision, components saved as
    None, ...) are addressed to their own users, not to someone running ``sc-compile``; our own
    messages (``sc_compile.*`` loggers: a missing α table, a fallback) still reach the console. Only
    this entry point does this, never the library.
    """
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    if importlib.util.find_spec("transformers") is not None:  # an optional dependency (the demo extra)
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("demo", "calibrate"):
        quiet_third_party_notices()
    return int(args.func(args))
