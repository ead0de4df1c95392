"""Time of a full step and of a cached step under Inductor, on this CPU, in one process.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/step_times.py [--model tiny-flux|demo-flux|large-flux]

Both steps run the same compiled model in one process, interleaved, so the ratio is meaningful
on a shared, noisy machine. Prints compile times, graph counts and node counts too.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import sc_compile
from sc_compile.runtime.dispatch import latest_runtime


def build(model: str):
    from diffusers import FluxTransformer2DModel

    from sc_compile.demo.models import flux_config

    torch.manual_seed(0)
    if model == "demo-flux":
        transformer = FluxTransformer2DModel(**flux_config()).eval()
        tokens, text, channels = 49, 4, flux_config()["in_channels"]
    elif model == "large-flux":  # random init, for speed only: ~35M parameters, 1024 image tokens
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=2,
            num_single_layers=4,
            attention_head_dim=64,
            num_attention_heads=8,
            joint_attention_dim=512,
            pooled_projection_dim=256,
            axes_dims_rope=[16, 24, 24],
        ).eval()
        tokens, text, channels = 1024, 64, 64
    else:
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=8,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=[4, 6, 6],
        ).eval()
        tokens, text, channels = 16, 8, 8
    config = transformer.config
    inputs = dict(
        hidden_states=torch.randn(1, tokens, channels),
        encoder_hidden_states=torch.randn(1, text, config.joint_attention_dim),
        pooled_projections=torch.randn(1, config.pooled_projection_dim),
        img_ids=torch.zeros(tokens, 3),
        txt_ids=torch.zeros(text, 3),
        return_dict=False,
    )
    return transformer, inputs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["demo-flux", "tiny-flux", "large-flux"], default="tiny-flux")
    parser.add_argument("--generations", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    transformer, inputs = build(args.model)
    explanation = sc_compile.explain(transformer, **inputs, timestep=torch.tensor([1.0]))
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = torch.compile(transformer, backend="scalingcache", options={"warmup_steps": 2, "alpha": "ones"})
    steps = 6  # warm-up 2: full, full, then the schedule decides
    full_times, cached_times = [], []
    first = None
    with torch.no_grad():
        for generation in range(args.generations + 1):
            for t in torch.linspace(1.0, 0.1, steps):
                start = time.perf_counter()
                compiled(**inputs, timestep=t.reshape(1))
                elapsed = time.perf_counter() - start
                runtime = latest_runtime(transformer)
                report = runtime.report()
                step = report.num_steps - 1
                if generation == 0:
                    first = first or elapsed
                    continue
                (full_times if step in report.full_steps else cached_times).append(elapsed)
    runtime = latest_runtime(transformer)
    full_ms, cached_ms = statistics.median(full_times) * 1e3, statistics.median(cached_times) * 1e3
    print(
        f"model: {args.model} ({sum(p.numel() for p in transformer.parameters()) / 1e6:.2f}M params), "
        f"{len(explanation.blocks)} blocks, {len(explanation.cache_points)} cache points"
    )
    # A recompile would compile another graph: one graph over all generations means none.
    print(f"dynamo graphs over {args.generations + 1} generations: {counters['stats']['unique_graphs']}")
    print(
        f"compile: full-step graph {runtime.full_step.compile_seconds:.1f} s ({runtime.full_step.num_compute_nodes} "
        "nodes), "
        f"cached-step graph {runtime.cached_step.compile_seconds:.1f} s ({runtime.cached_step.num_compute_nodes} "
        "nodes); "
        f"first call {first:.1f} s"
    )
    print(f"full step:   median {full_ms:.3f} ms over {len(full_times)} calls")
    print(
        f"cached step: median {cached_ms:.3f} ms over {len(cached_times)} calls ({cached_ms / full_ms:.1%} of a full "
        "step)"
    )


if __name__ == "__main__":
    main()
