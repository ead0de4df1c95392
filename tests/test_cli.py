"""``sc-compile calibrate`` on any saved diffusers pipeline, and what it refuses before it runs."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import sc_compile
from sc_compile.calibration.table import AlphaTable
from sc_compile.cli import build_parser, calibration_samples, main

# Runs `python -m MODULE` as without some packages (a missing optional dependency).
RUN_WITHOUT = Path(__file__).resolve().parent / "run_without.py"

FLUX_INDEX = {
    "_class_name": "FluxPipeline",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": [None, None],
    "tokenizer": [None, None],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


@pytest.fixture
def nothing_runs(monkeypatch):
    """Loading a model or calibrating fails the test: the refusals must come first."""

    def must_not_run(*args, **kwargs):
        raise AssertionError("reached model loading or calibration before refusing")

    import diffusers

    import sc_compile.cli

    monkeypatch.setattr(sc_compile, "calibrate", must_not_run)
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", must_not_run)
    monkeypatch.setattr(sc_compile.cli, "load_demo_style_pipeline", must_not_run)


@pytest.fixture
def index_only_pipeline(tmp_path) -> Path:
    """A directory that looks like a saved pipeline (its model_index.json) and holds nothing else."""
    directory = tmp_path / "pipeline"
    directory.mkdir()
    (directory / "model_index.json").write_text(json.dumps(FLUX_INDEX))
    return directory


@pytest.fixture
def embeddings_file(tmp_path) -> Path:
    path = tmp_path / "embeds.safetensors"
    save_file({"prompt_embeds": torch.randn(2, 4, 64), "pooled_prompt_embeds": torch.randn(2, 64)}, str(path))
    return path


def _refusal(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    code = exit_info.value.code
    # argparse exits with 2 and prints to stderr; our checks exit with the message itself.
    return capsys.readouterr().err if code == 2 else str(code)


@pytest.mark.parametrize("bad", ["missing", "file", "empty_dir", "bare_transformer"])
def test_calibrate_refuses_a_bad_model_path(tmp_path, capsys, nothing_runs, embeddings_file, bad):
    path = tmp_path / bad
    if bad == "file":
        path.write_text("not a model")
    elif bad == "empty_dir":
        path.mkdir()
    elif bad == "bare_transformer":
        path.mkdir()
        (path / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel"}))
    message = _refusal(
        ["calibrate", str(path), "--out", str(tmp_path / "alpha.safetensors"), "--prompt-embeds", str(embeddings_file)],
        capsys,
    )
    assert str(path) in message and "save_pretrained" in message, message
    assert not (tmp_path / "alpha.safetensors").exists()


def test_calibrate_refuses_a_pipeline_without_transformer(
    tmp_path, capsys, nothing_runs, index_only_pipeline, embeddings_file
):
    index = {**FLUX_INDEX, "transformer": [None, None]}
    (index_only_pipeline / "model_index.json").write_text(json.dumps(index))
    message = _refusal(
        [
            "calibrate",
            str(index_only_pipeline),
            "--out",
            str(tmp_path / "a.safetensors"),
            "--prompt-embeds",
            str(embeddings_file),
        ],
        capsys,
    )
    assert "no transformer component" in message, message


def test_calibrate_refuses_finer_steps_not_above_the_steps(tmp_path, capsys, nothing_runs, index_only_pipeline):
    argv = ["calibrate", str(index_only_pipeline), "--out", str(tmp_path / "a.safetensors"), "--steps", "10"]
    message = _refusal([*argv, "--finer-steps", "10"], capsys)
    assert "--finer-steps 10 must be more than --steps 10" in message, message
    assert "--finer-steps: must be at least 0" in _refusal([*argv, "--finer-steps", "-1"], capsys)
    message = _refusal([*argv, "--finer-steps", "20", "--plan-samples", "0"], capsys)
    assert "--plan-samples 0 stores none" in message, message
    message = _refusal([*argv[:-1], "3", "--finer-steps", "20"], capsys)
    assert "none are chosen at --steps 3" in message, message


@pytest.mark.parametrize("steps", ["0", "-1", "2", "many"])
def test_calibrate_refuses_too_few_steps(tmp_path, capsys, nothing_runs, index_only_pipeline, embeddings_file, steps):
    message = _refusal(
        [
            "calibrate",
            str(index_only_pipeline),
            "--out",
            str(tmp_path / "a.safetensors"),
            "--prompt-embeds",
            str(embeddings_file),
            "--steps",
            steps,
        ],
        capsys,
    )
    assert "--steps" in message and ("at least 3" in message or "integer" in message), message


@pytest.mark.parametrize("option", ["--seeds", "--classes"])
def test_calibrate_refuses_zero_generations(tmp_path, capsys, nothing_runs, index_only_pipeline, option):
    message = _refusal(
        ["calibrate", str(index_only_pipeline), "--out", str(tmp_path / "a.safetensors"), option, "0"], capsys
    )
    assert option in message and "at least 1" in message, message


@pytest.mark.parametrize("bad", ["directory", "missing_parent", "parent_is_a_file"])
def test_calibrate_refuses_an_unwritable_output(
    tmp_path, capsys, nothing_runs, index_only_pipeline, embeddings_file, bad
):
    out = {
        "directory": tmp_path,
        "missing_parent": tmp_path / "no" / "such" / "alpha.safetensors",
        "parent_is_a_file": embeddings_file / "alpha.safetensors",
    }[bad]
    message = _refusal(
        ["calibrate", str(index_only_pipeline), "--out", str(out), "--prompt-embeds", str(embeddings_file)], capsys
    )
    assert "--out" in message and str(out) in message, message


def test_calibrate_refuses_bad_prompt_embeddings(tmp_path, capsys, nothing_runs, index_only_pipeline):
    out = str(tmp_path / "a.safetensors")
    missing = _refusal(
        ["calibrate", str(index_only_pipeline), "--out", out, "--prompt-embeds", str(tmp_path / "none.safetensors")],
        capsys,
    )
    assert "is not a file" in missing, missing
    not_safetensors = tmp_path / "embeds.txt"
    not_safetensors.write_text("a cat")
    garbage = _refusal(
        ["calibrate", str(index_only_pipeline), "--out", out, "--prompt-embeds", str(not_safetensors)], capsys
    )
    assert "not a safetensors file" in garbage, garbage
    ragged = tmp_path / "ragged.safetensors"
    save_file({"prompt_embeds": torch.randn(2, 4, 8), "pooled_prompt_embeds": torch.randn(3, 8)}, str(ragged))
    message = _refusal(["calibrate", str(index_only_pipeline), "--out", out, "--prompt-embeds", str(ragged)], capsys)
    assert "same first dimension" in message, message
    no_prompts = _refusal(["calibrate", str(index_only_pipeline), "--out", out], capsys)
    assert "needs prompts" in no_prompts, no_prompts
    assert not Path(out).exists()


def test_calibrate_refuses_text_prompts_without_a_text_encoder(tmp_path, capsys, nothing_runs, index_only_pipeline):
    message = _refusal(
        ["calibrate", str(index_only_pipeline), "--out", str(tmp_path / "a.safetensors"), "--prompt", "a cat"], capsys
    )
    assert "no text encoder" in message and "--prompt-embeds" in message, message


def test_prompts_give_one_generation_per_prompt_and_seed(tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a cat\n\na dog\n")
    args = build_parser().parse_args(
        [
            "calibrate",
            "DIR",
            "--out",
            "a.safetensors",
            "--prompt",
            "a bird",
            "--prompts-file",
            str(prompts_file),
            "--steps",
            "5",
            "--seeds",
            "2",
            "--height",
            "64",
        ]
    )
    from sc_compile.cli import read_prompts

    prompts = read_prompts(args)
    assert prompts == ["a bird", "a cat", "a dog"]
    samples = calibration_samples(args, prompts, None)
    assert [(s["prompt"], s["seed"]) for s in samples] == [(p, seed) for seed in (1000, 1001) for p in prompts]
    assert all(s["num_inference_steps"] == 5 and s["height"] == 64 and "width" not in s for s in samples)


PROMPT_WORDS = ["<pad>", "</s>", "<unk>", "a", "cat", "dog", "bird", "on", "the", "mat"]


def _word_tokenizer(max_length: int):
    """A word-level tokenizer over PROMPT_WORDS, built locally (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(PROMPT_WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )


def _save_tiny_flux_pipeline(directory: Path, text_encoders: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A tiny FluxPipeline saved with save_pretrained: with tiny CLIP and T5 text encoders and
    tokenizers, or without (it then runs on prompt embeddings). Returns two prompts' embeddings."""
    from diffusers import AutoencoderKL, FluxPipeline

    from sc_compile.demo.models import flux_scheduler, random_flux_demo

    demo, embeddings = random_flux_demo(seed=0)
    vae = AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(4, 4),
        latent_channels=4,
        norm_num_groups=2,
        layers_per_block=1,
    )
    encoders: dict[str, object] = dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    if text_encoders:
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        torch.manual_seed(0)
        # Widths as the demo transformer's pooled_projection_dim and joint_attention_dim (64).
        clip = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(PROMPT_WORDS),
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=1,
                num_attention_heads=4,
                max_position_embeddings=16,
                bos_token_id=1,
                eos_token_id=1,
                pad_token_id=0,
            )
        ).eval()
        t5 = T5EncoderModel(
            T5Config(vocab_size=len(PROMPT_WORDS), d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4)
        ).eval()
        encoders = dict(
            text_encoder=clip, tokenizer=_word_tokenizer(16), text_encoder_2=t5, tokenizer_2=_word_tokenizer(32)
        )
    pipe = FluxPipeline(scheduler=flux_scheduler(), vae=vae, transformer=demo.transformer, **encoders)
    pipe.save_pretrained(directory)
    prompt_embeds, pooled = embeddings([0, 3])
    return prompt_embeds, pooled


def test_calibrate_runs_on_a_saved_pipeline_with_text_prompts(tmp_path):
    _save_tiny_flux_pipeline(tmp_path / "pipeline", text_encoders=True)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat on the mat\na dog\n")
    out = tmp_path / "alpha.safetensors"
    command = [
        sys.executable,
        "-m",
        "sc_compile",
        "calibrate",
        str(tmp_path / "pipeline"),
        "--out",
        str(out),
        "--prompts-file",
        str(prompts),
        "--prompt",
        "a bird",
        "--steps",
        "4",
        "--seeds",
        "1",
        "--height",
        "28",
        "--width",
        "28",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 samples x 4 steps" in result.stdout, result.stdout
    table = AlphaTable.load(out)
    assert (table.model_class, table.num_steps, table.num_samples) == ("FluxTransformer2DModel", 4, 3)
    assert not torch.equal(table.alpha[2:], torch.ones_like(table.alpha[2:]))


def test_calibrate_runs_on_a_saved_pipeline_with_prompt_embeddings(tmp_path):
    prompt_embeds, pooled = _save_tiny_flux_pipeline(tmp_path / "pipeline")
    embeds = tmp_path / "embeds.safetensors"
    save_file({"prompt_embeds": prompt_embeds.contiguous(), "pooled_prompt_embeds": pooled.contiguous()}, str(embeds))
    out = tmp_path / "alpha.safetensors"
    command = [
        sys.executable,
        "-m",
        "sc_compile",
        "calibrate",
        str(tmp_path / "pipeline"),
        "--out",
        str(out),
        "--prompt-embeds",
        str(embeds),
        "--steps",
        "5",
        "--seeds",
        "1",
        "--height",
        "28",
        "--width",
        "28",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 samples x 5 steps" in result.stdout, result.stdout
    assert "100%" in result.stderr, result.stderr  # the progress bar over the generations
    table = AlphaTable.load(out)
    assert (table.model_class, table.num_steps, table.num_samples) == ("FluxTransformer2DModel", 5, 2)
    assert table.scheduler == "FlowMatchEulerDiscreteScheduler" and "--prompt-embeds" in table.command
    # α was fitted from step 2 on: not the all-ones table of an uncalibrated model.
    assert not torch.equal(table.alpha[2:], torch.ones_like(table.alpha[2:]))

    # The backend accepts the table for the same pipeline, loaded back from the directory.
    from diffusers import DiffusionPipeline

    absent = {name: None for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")}
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "pipeline", **absent)
    pipe.transformer = torch.compile(
        pipe.transformer, backend="scalingcache", options={"compiler": "eager", "alpha": str(out), "warmup_steps": 2}
    )
    with torch.no_grad():
        pipe(
            prompt_embeds=prompt_embeds[:1],
            pooled_prompt_embeds=pooled[:1],
            height=28,
            width=28,
            num_inference_steps=5,
            output_type="latent",
        )
    assert sc_compile.report(pipe.transformer).alpha_source.startswith(f"{out} (")  # the table given


def test_calibrate_says_what_to_install_for_a_pipeline_diffusers_loads_only_with_accelerate(tmp_path):
    """Wan's transformer keeps modules in float32, which diffusers' from_pretrained loads only with
    accelerate. Run as without accelerate (and peft, which needs it), whether or not it is installed."""
    from diffusers import AutoencoderKLWan, WanPipeline

    from sc_compile.demo.models import random_wan_demo, wan_scheduler

    demo, embeddings = random_wan_demo(seed=0)
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    WanPipeline(
        tokenizer=None, text_encoder=None, vae=vae, scheduler=wan_scheduler(), transformer=demo.transformer
    ).save_pretrained(tmp_path / "wan")
    embeds = tmp_path / "embeds.safetensors"
    save_file({"prompt_embeds": embeddings([0])[0].contiguous()}, str(embeds))
    command = [
        sys.executable,
        str(RUN_WITHOUT),
        "accelerate,peft",
        "sc_compile",
        "calibrate",
        str(tmp_path / "wan"),
        "--out",
        str(tmp_path / "a.safetensors"),
        "--prompt-embeds",
        str(embeds),
        "--steps",
        "3",
        "--seeds",
        "1",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "pip install accelerate" in result.stderr, result.stderr


def test_cli_choices_are_the_config_enums_values():
    """The CLI writes its choices without importing torch; they must be the enums' values."""
    from sc_compile import cli
    from sc_compile.config import Granularity, InnerCompiler, Prediction
    from sc_compile.contract import Statistic

    for choices, enum_type in [
        (cli.GRANULARITY_CHOICES, Granularity),
        (cli.PREDICTION_CHOICES, Prediction),
        (cli.STATISTIC_CHOICES, Statistic),
        (cli.COMPILER_CHOICES, InnerCompiler),
    ]:
        assert choices == tuple(member.value for member in enum_type)


@pytest.mark.parametrize("command", [["demo"], ["calibrate", "assets/demo_flux", "--out", "alpha.safetensors"]])
def test_demo_models_without_the_demo_extra_name_it(command, tmp_path):
    """Without transformers (a wheel installed without [demo]) the demo and a demo-style calibration
    say which extra to install instead of diffusers' bare ModuleNotFoundError."""
    root = Path(sc_compile.__file__).resolve().parents[1]
    if command[0] == "calibrate":
        command = ["calibrate", str(root / "assets/demo_flux"), "--out", str(tmp_path / "alpha.safetensors")]
    run = [sys.executable, str(RUN_WITHOUT), "transformers,peft", "sc_compile", *command]
    result = subprocess.run(run, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert 'pip install "sc-compile[demo]"' in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_demo_models_module_without_transformers_names_the_extra(tmp_path):
    """The same for the Python API: importing the demo models names the extra; other import errors
    are left as they are."""
    from sc_compile.demo import demo_extra_missing

    other = ModuleNotFoundError("No module named 'tokenizers'", name="tokenizers")
    assert demo_extra_missing(other) is other
    code = "from sc_compile.demo.models import load_flux_demo"
    script = tmp_path / "load_demo.py"
    script.write_text(code)
    result = subprocess.run(
        [sys.executable, str(RUN_WITHOUT), "transformers,peft", "load_demo"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("ModuleNotFoundError: the demo models run in"), (
        result.stderr
    )
    assert 'pip install "sc-compile[demo]"' in result.stderr


def test_threads_default_to_torchs_and_are_said():
    """The CLI uses torch's thread count unless --threads sets one, and says which (the Python API
    never sets it)."""
    from sc_compile.cli import set_threads

    for command in (["demo"], ["calibrate", "DIR", "--out", "alpha.safetensors"]):
        assert build_parser().parse_args(command).threads is None
        assert build_parser().parse_args([*command, "--threads", "3"]).threads == 3
    before = torch.get_num_threads()
    assert set_threads(None) == f"{before} (torch's default; --threads N to change)"
    assert torch.get_num_threads() == before
    try:
        assert set_threads(before + 1) == f"{before + 1} (--threads)"
        assert torch.get_num_threads() == before + 1
    finally:
        torch.set_num_threads(before)


def test_help_has_no_raw_markup_and_every_option_is_explained():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in [("sc-compile", parser), *subparsers.choices.items()]:
        text = sub.format_help()
        assert "`" not in text, (name, text)
        for action in sub._actions:
            assert action.help, (name, action.option_strings or action.dest)
