"""Options, their validation, and the errors bad input gets."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest
import torch

import sc_compile
from sc_compile.calibration.table import AlphaTable, AlphaTableError
from sc_compile.config import Granularity, InnerCompiler, ScalingCacheConfig, split_options

from dummy_dit import DummyDiT


def test_backend_resolves_through_the_entry_point():
    entry_points = importlib.metadata.entry_points(group="torch_dynamo_backends")
    (entry,) = [e for e in entry_points if e.name == "scalingcache"]
    from sc_compile.backends.scalingcache import scalingcache

    assert entry.load() is scalingcache
    from torch._dynamo.backends.registry import lookup_backend

    assert lookup_backend("scalingcache") is scalingcache


def test_importing_the_package_loads_nothing_heavy():
    code = "import sys, sc_compile; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_unknown_option_names_the_valid_keys():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['warmup'\].*'warmup_steps'.*'granularity'"):
        split_options({"warmup": 3})


def test_unknown_option_is_an_error_through_torch_compile():
    compiled = torch.compile(DummyDiT(), backend="scalingcache", options={"warm_up_steps": 3})
    with pytest.raises(Exception, match=r"unknown option\(s\) \['warm_up_steps'\]"), torch.no_grad():
        compiled(torch.ones(1, 2, 4), torch.tensor([1.0]))


def test_inductor_options_and_mode_pass_through():
    config, patches = split_options({"warmup_steps": 4, "max_autotune": True, "epilogue_fusion": False})
    assert config.warmup_steps == 4
    assert patches == {"max_autotune": True, "epilogue_fusion": False}
    _, patches = split_options({}, mode="max-autotune")
    assert patches["max_autotune"] is True
    with pytest.raises(ValueError, match="unknown mode 'fastest'"):
        split_options({}, mode="fastest")


def test_inductor_options_with_another_inner_compiler_are_an_error():
    with pytest.raises(ValueError, match="compiler='eager'"):
        split_options({"compiler": "eager", "max_autotune": True})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"warmup_steps": 1}, "warmup_steps must be at least 2"),
        ({"warmup_steps": "10"}, "warmup_steps must be an int or None, but got '10'"),
        ({"granularity": "layer"}, "granularity must be one of 'block', 'module', but got 'layer'"),
        ({"prediction": "noise"}, "prediction must be one of 'hidden', 'residual', but got 'noise'"),
        ({"compiler": "tvm"}, "compiler must be one of 'inductor', 'aot_eager', 'eager', but got 'tvm'"),
        ({"final_full_steps": -1}, "final_full_steps must be an int >= 0"),
        ({"share_decision_across_streams": "yes"}, "share_decision_across_streams must be a bool"),
        ({"alpha": "/no/such/alpha.safetensors"}, "is not a file"),
        ({"alpha": 3}, "alpha must be 'ones', an AlphaTable, a path or None, but got int"),
        ({"cache_dtype": torch.int8}, "cache_dtype must be a floating torch.dtype"),
    ],
)
def test_bad_values_are_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        split_options(options)


def test_enums_accept_their_values():
    config = ScalingCacheConfig(granularity="module", compiler="eager")
    assert config.granularity is Granularity.MODULE
    assert config.compiler is InnerCompiler.EAGER


def test_default_warmup_scales_with_a_known_step_count():
    config = ScalingCacheConfig()
    assert config.warmup_for(None) == 10
    assert config.warmup_for(50) == 10
    assert config.warmup_for(28) == 6
    assert config.warmup_for(10) == 2
    assert ScalingCacheConfig(warmup_steps=4).warmup_for(10) == 4


def test_alpha_file_for_another_model_is_refused(tmp_path):
    path = tmp_path / "alpha.safetensors"
    AlphaTable(torch.ones(7, 5), "OtherDiT", "0123456789abcdef", "block").save(path)
    compiled = torch.compile(DummyDiT(), backend="scalingcache", options={"compiler": "eager", "alpha": str(path)})
    with (
        pytest.raises(
            Exception, match=r"does not fit this model: it has 5 cache points \(the model has 3\).*calibrate"
        ),
        torch.no_grad(),
    ):
        compiled(torch.ones(1, 2, 4), torch.tensor([1.0]))


def test_alpha_file_of_another_granularity_is_refused(tmp_path):
    model = DummyDiT()
    explanation = sc_compile.explain(model, torch.ones(1, 2, 4), torch.tensor([1.0]))
    path = tmp_path / "alpha.safetensors"
    AlphaTable(torch.ones(7, 3), explanation.model_class, explanation.fingerprint, "module").save(path)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="scalingcache", options={"compiler": "eager", "alpha": str(path)})
    with (
        pytest.raises(Exception, match=r"granularity 'module' \(the model is compiled with 'block'\)"),
        torch.no_grad(),
    ):
        compiled(torch.ones(1, 2, 4), torch.tensor([1.0]))


def test_alpha_file_round_trip_and_corrupt_files(tmp_path):
    table = AlphaTable(
        torch.rand(4, 3) + 0.5,
        "DummyDiT",
        "abc",
        "block",
        timesteps=(1.0, 0.75, 0.5, 0.25),
        scheduler="Euler",
        beta=0.9,
        num_samples=5,
        command="calibrate x",
    )
    path = tmp_path / "alpha.safetensors"
    table.save(path)
    loaded = AlphaTable.load(path)
    assert torch.equal(loaded.alpha, table.alpha)
    assert (loaded.timesteps, loaded.scheduler, loaded.beta, loaded.num_samples, loaded.command) == (
        table.timesteps,
        "Euler",
        0.9,
        5,
        "calibrate x",
    )
    assert "steps=4, points=3" in repr(loaded)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(AlphaTableError, match="not a readable α file"):
        AlphaTable.load(truncated)
    with pytest.raises(AlphaTableError, match="non-finite"):
        AlphaTable(torch.tensor([[1.0, float("nan")]]), "DummyDiT", "abc", "block")


def test_final_full_steps_without_a_step_count_is_an_error():
    compiled = torch.compile(DummyDiT(), backend="scalingcache", options={"compiler": "eager", "final_full_steps": 1})
    with pytest.raises(ValueError, match="final_full_steps=1 needs the generation's step count"), torch.no_grad():
        compiled(torch.ones(1, 2, 4), torch.tensor([1.0]))


def test_alpha_file_with_nan_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "nan.safetensors"
    AlphaTable(torch.ones(4, 3), "DummyDiT", "abc", "block").save(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    alpha = torch.ones(4, 3)
    alpha[2, 1] = float("nan")
    save_file({"alpha": alpha}, str(path), metadata=metadata)
    with pytest.raises(AlphaTableError, match=r"non-finite values \(first at \[step, point\] \[\[2, 1\]\]\)"):
        AlphaTable.load(path)


@pytest.mark.parametrize(
    "config",
    [
        ScalingCacheConfig(),
        ScalingCacheConfig(granularity="module", prediction="residual", statistic="full", compiler="eager"),
        ScalingCacheConfig(cache_dtype=torch.bfloat16, full_steps=6, coefficients="chained", stochastic_sampler="warn"),
        ScalingCacheConfig(alpha="ones", warmup_steps=3, final_full_steps=2, num_inference_steps=20, speedup=None),
        ScalingCacheConfig(max_cache_bytes=1 << 20, static_interval=3, change_points="output", fallback="inductor"),
    ],
)
def test_config_to_dict_round_trips_through_json(config):
    import json

    serialized = config.to_dict()
    assert set(serialized) == {"_type", "_version", "_data"}
    assert serialized["_type"] == "ScalingCacheConfig" and serialized["_version"] == 1
    back = ScalingCacheConfig.from_dict(json.loads(json.dumps(serialized)))
    assert back == config
    assert isinstance(back.granularity, Granularity) and isinstance(back.compiler, InnerCompiler)


def test_config_with_an_alpha_path_round_trips(tmp_path):
    path = tmp_path / "alpha.safetensors"
    AlphaTable(torch.ones(4, 3), "DummyDiT", "abc", "block").save(path)
    config = ScalingCacheConfig(alpha=path)
    assert ScalingCacheConfig.from_dict(config.to_dict()).alpha == str(path)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: {**d, "_version": 2}, r"version 2 was written by another sc_compile; this one reads versions \[1\]"),
        (lambda d: {**d, "_type": "Float8Config"}, "expected a serialised ScalingCacheConfig"),
        (lambda d: {"_data": d["_data"]}, "keys '_type', '_version' and '_data'"),
        (lambda d: {**d, "_data": {**d["_data"], "warmup": 3}}, r"unknown option\(s\) \['warmup'\]"),
        (lambda d: {**d, "_data": {**d["_data"], "cache_dtype": "torch.nothing"}}, "is not a torch dtype"),
        (lambda d: {**d, "_data": {**d["_data"], "granularity": "layer"}}, "granularity must be one of"),
    ],
)
def test_config_from_dict_refuses_what_it_cannot_read(mutate, message):
    with pytest.raises(ValueError, match=message):
        ScalingCacheConfig.from_dict(mutate(ScalingCacheConfig().to_dict()))


def test_config_with_an_in_memory_table_records_it_and_from_dict_says_what_to_do():
    table = AlphaTable(torch.ones(4, 3), "DummyDiT", "abc", "block")
    serialized = ScalingCacheConfig(alpha=table).to_dict()
    assert serialized["_data"]["alpha"]["fingerprint"] == "abc"
    with pytest.raises(ValueError, match=r"save the table \(AlphaTable.save\) and give its path"):
        ScalingCacheConfig.from_dict(serialized)


def test_option_enums_read_as_their_values_everywhere_a_string_is_read():
    """The enums travel through the passes, the runtime and messages (issue 24 item 6): each
    formats, prints, equals and hashes as its value; repr still names the member."""
    from sc_compile.config import Coefficients, Fallback, Prediction
    from sc_compile.contract import Statistic

    for member in [Granularity.MODULE, Prediction.RESIDUAL, Statistic.FULL, InnerCompiler.AOT_EAGER, Fallback.ERROR]:
        assert f"{member}" == str(member) == "{}".format(member) == member.value  # noqa: UP032
        assert member == member.value and hash(member) == hash(member.value)
        assert "|".join(["x", member]) == f"x|{member.value}"
    assert repr(Coefficients.FITTED) == "<Coefficients.FITTED: 'fitted'>"


def test_the_passes_and_explain_carry_the_config_enums():
    from sc_compile.config import Prediction

    explanation = sc_compile.explain(DummyDiT(), torch.ones(1, 2, 4), torch.tensor([1.0]), granularity="module")
    assert explanation.granularity is Granularity.MODULE
    assert "(module granularity)" in str(explanation)
    from sc_compile.runtime.dispatch import runtimes_of

    model = DummyDiT()
    compiled = torch.compile(model, backend="scalingcache", options={"compiler": "eager", "prediction": "residual"})
    with torch.no_grad():
        compiled(torch.ones(1, 2, 4), torch.tensor([1.0]))
    (runtime,) = runtimes_of(model)
    assert runtime.granularity is Granularity.BLOCK
    assert runtime.config.prediction is Prediction.RESIDUAL
