"""``sc-compile`` / ``python -m sc_compile``: demo, calibrate, inspect."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

# The transformer classes whose demo-style directories the CLI builds pipelines for.
DEMO_CLASSES = ("FluxTransformer2DModel", "WanTransformer3DModel")


def _command_line() -> str:
    return "python -m sc_compile " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def load_demo_style_pipeline(model_dir: str | Path) -> tuple[Any, Any, str]:
    """A transformer directory (``save_pretrained`` output plus class embeddings, the format of
    ``assets/demo_*``) as a real diffusers pipeline: ``(pipeline, embeddings, class name)``."""
    from sc_compile.demo import models

    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise SystemExit(f"{model_dir}: no config.json; expected a transformer saved with save_pretrained")
    class_name = json.loads(config_path.read_text())["_class_name"]
    pipe: Any
    if class_name == "FluxTransformer2DModel":
        pipe, embeddings = models.load_flux_demo(path=model_dir)
    elif class_name == "WanTransformer3DModel":
        pipe, embeddings = models.load_wan_demo(path=model_dir)
    else:
        raise SystemExit(
            f"{model_dir}: {class_name} is not a demo-style model this CLI can build a pipeline for "
            f"({', '.join(DEMO_CLASSES)}); calibrate other models with the Python API sc_compile.calibrate(pipe, samples)"
        )
    return pipe, embeddings, class_name


def cmd_calibrate(args: argparse.Namespace) -> int:
    import torch

    from sc_compile.calibration import calibrate

    torch.set_num_threads(args.threads)
    pipe, embeddings, class_name = load_demo_style_pipeline(args.model_dir)
    from sc_compile.demo.check import demo_size

    size = demo_size(class_name)
    samples = []
    for seed in range(args.seeds):
        for label in range(args.classes):
            samples.append(
                {
                    **embeddings.pipeline_kwargs([label], guidance_scale=args.guidance_scale),
                    **size,
                    "num_inference_steps": args.steps,
                    "seed": 1000 + seed,
                    "output_type": "pt",
                }
            )
    start = time.perf_counter()
    table = calibrate(
        pipe,
        samples,
        beta=args.beta,
        granularity=args.granularity,
        prediction=args.prediction,
        compiler=args.compiler,
        command=_command_line(),
    )
    seconds = time.perf_counter() - start
    table.save(args.out)
    print(f"wrote {args.out}: {table!r}")
    print(f"calibration: {len(samples)} samples x {table.num_steps} steps in {seconds:.1f} s")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from sc_compile.alpha import AlphaTable

    table = AlphaTable.load(args.file)
    print(repr(table))
    print(f"command: {table.command or '(not recorded)'}")
    mean, std = table.step_statistics()
    print("step  timestep      α mean   α std    α min    α max")
    for step in range(table.num_steps):
        row = table.alpha[step]
        timestep = f"{table.timesteps[step]:.5g}" if table.timesteps else "-"
        print(f"{step:4d}  {timestep:>10}  {mean[step]:7.4f}  {std[step]:7.4f}  {float(row.min()):7.4f}  {float(row.max()):7.4f}")
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


def cmd_demo(args: argparse.Namespace) -> int:
    from sc_compile.demo.main import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sc-compile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="uncached vs ScalingCache on the shipped trained demo model")
    demo.add_argument("--model", choices=["flux", "wan"], default="flux")
    demo.add_argument("--steps", type=int, default=None, help="inference steps (default: 28 flux, 20 wan)")
    demo.add_argument("--samples", type=int, default=None, help="samples (default: 10 flux, 4 wan)")
    demo.add_argument("--warmup-steps", type=int, default=None, help="S_f (default: scaled from 10 at 50 steps)")
    demo.add_argument("--guidance-scale", type=float, default=3.0)
    demo.add_argument("--compiler", choices=["inductor", "aot_eager", "eager"], default="inductor")
    demo.add_argument("--out", default="out/demo", help="output directory for the pictures")
    demo.add_argument("--threads", type=int, default=1)
    demo.set_defaults(func=cmd_demo)

    cal = sub.add_parser("calibrate", help="write an α file for a model directory")
    cal.add_argument("model_dir", help="a transformer directory with class embeddings (assets/demo_* format)")
    cal.add_argument("--out", required=True, help="the α file to write (.safetensors)")
    cal.add_argument("--steps", type=int, default=28)
    cal.add_argument("--classes", type=int, default=10, help="class labels used as prompts")
    cal.add_argument("--seeds", type=int, default=2, help="seeds per class")
    cal.add_argument("--guidance-scale", type=float, default=3.0)
    cal.add_argument("--beta", type=float, default=0.97)
    cal.add_argument("--granularity", choices=["block", "module"], default="block")
    cal.add_argument("--prediction", choices=["hidden", "residual"], default="hidden")
    cal.add_argument("--compiler", choices=["inductor", "aot_eager", "eager"], default="eager")
    cal.add_argument("--threads", type=int, default=1)
    cal.set_defaults(func=cmd_calibrate)

    inspect = sub.add_parser("inspect", help="summarise an α file")
    inspect.add_argument("file")
    inspect.add_argument("--plot", help="write a heat-map PNG of α over steps x points (needs matplotlib)")
    inspect.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))
