"""What ships is what is tested: the wheel, installed into a fresh environment, runs the product;
the tests import the installed package and nothing of the source tree beside it."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import sc_compile.backends
import sc_compile.passes

ROOT = Path(__file__).resolve().parents[1]
SOURCE_FOLDERS = {"passes": "sc_compile/passes", "backends": "sc_compile/backends", "assets": "sc_compile/assets"}
SHIPPED_TABLE = "demo_flux/alpha_flux_28steps.safetensors"


@pytest.mark.parametrize("name", sorted(SOURCE_FOLDERS))
def test_source_folders_are_not_importable_as_top_level_packages(name):
    # `python -m pytest` from the root would make them importable: a second copy of every module.
    assert importlib.util.find_spec(name) is None, f"{name} is importable from {importlib.util.find_spec(name).origin}"
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(name)


def test_subpackages_are_the_source_folders_under_the_package_name():
    # The editable install maps them with the wheel's package-dir: no link, no copy.
    for module, folder in ((sc_compile.passes, "passes"), (sc_compile.backends, "backends")):
        origin = Path(module.__file__).resolve()
        installed = Path(sysconfig.get_paths()["purelib"]).resolve() / "sc_compile" / folder / "__init__.py"
        assert origin in (ROOT / folder / "__init__.py", installed), origin
    assert not (ROOT / "sc_compile" / "passes").exists() and not (ROOT / "sc_compile" / "backends").exists()


@pytest.mark.packaging
def test_wheel_holds_the_package_and_the_shipped_data_only(built_wheel):
    with zipfile.ZipFile(built_wheel) as wheel:
        names = set(wheel.namelist())
    for folder, installed in SOURCE_FOLDERS.items():
        for source in (ROOT / folder).rglob("*.py"):
            assert f"{installed}/{source.relative_to(ROOT / folder).as_posix()}" in names, source
    for model in ("demo_flux", "demo_wan", "demo_sd3"):
        for file in (
            "config.json",
            "diffusion_pytorch_model.safetensors",
            "class_embeddings.safetensors",
            "MODEL_CARD.md",
        ):
            assert f"sc_compile/assets/{model}/{file}" in names
        shipped_tables = [(ROOT / "assets").glob(f"{model}/alpha*.safetensors")]
        for table in shipped_tables[0]:
            assert f"sc_compile/assets/{model}/{table.name}" in names, table
    assert "sc_compile/py.typed" in names
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {
        "sc_compile",
        built_wheel.name.split("-")[0] + "-" + built_wheel.name.split("-")[1] + ".dist-info",
    }, top_level
    # Training logs, sample pictures and the training code stay in the source tree.
    assert not [
        name
        for name in names
        if name.endswith(("train_log.txt", "samples.png")) or "/examples/" in name or "/train" in name
    ]


# Run in the fresh environment, from a directory outside the tree: the backend resolves by name
# through the entry point with no import of ours, and everything comes from that environment.
_PROBE = """
import importlib.metadata, importlib.util, json, sys
import torch
from torch._dynamo.backends.registry import lookup_backend
assert "sc_compile" not in sys.modules
backend = lookup_backend("scalingcache")
import sc_compile.backends, sc_compile.passes
from sc_compile.resources import assets_dir
print(json.dumps({
    "backend": sys.modules[backend.__module__].__file__,
    "passes": sc_compile.passes.__file__,
    "backends": sc_compile.backends.__file__,
    "assets": str(assets_dir()),
    "distributions": [
        str(d.locate_file("")) for d in importlib.metadata.distributions() if d.metadata["Name"] == "sc-compile"
    ],
    "top_level": [name for name in ("passes", "backends", "assets") if importlib.util.find_spec(name)],
}))
"""


def _dependency_view(tmp_path: Path) -> Path:
    """This environment's installed packages minus every part of sc_compile (its editable finder,
    its metadata), as links in one folder: the fresh environment reuses torch and diffusers from
    there instead of downloading them, and can only get sc_compile from the wheel."""
    site = Path(sysconfig.get_paths()["purelib"])
    view = tmp_path / "dependencies"
    view.mkdir()
    for entry in site.iterdir():
        if entry.name.lower().replace("-", "_").startswith(("sc_compile", "__editable__")) or entry.suffix == ".pth":
            continue
        (view / entry.name).symlink_to(entry)
    return view


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, command))} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.packaging
def test_installed_wheel_resolves_the_backend_and_runs_the_demo_with_the_shipped_table(built_wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "test_dependencies.pth").write_text(f"{_dependency_view(tmp_path)}\n")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            "--quiet",
            str(built_wheel),
        ]
    )

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    probe = json.loads(_run([str(python), "-c", _PROBE], cwd=elsewhere, env=env).stdout.strip().splitlines()[-1])
    assert probe["top_level"] == [], probe
    assert probe["distributions"] == [str(site)], probe
    for key in ("backend", "passes", "backends", "assets"):
        assert Path(probe[key]).is_relative_to(site / "sc_compile"), (key, probe[key])
    assert (Path(probe["assets"]) / SHIPPED_TABLE).is_file()

    demo = _run(
        [
            str(venv / "bin" / "sc-compile"),
            "demo",
            "--steps",
            "10",  # above the short-schedule limit (8): steps are cached
            "--samples",
            "2",
            "--compiler",
            "eager",
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=elsewhere,
        env=env,
    )
    output = demo.stdout + demo.stderr
    assert "no α table" not in output, output
    assert demo.stderr == "", demo.stderr  # no third-party notices on our CLI's console
    # The report names the table's source: the shipped 28-step table (resampled to 10 steps), with no
    # source-tree path (none exists in a wheel install).
    assert "α:        the table shipped with sc_compile for FluxTransformer2DModel (28 steps" in demo.stdout, output
    assert "assets/" not in demo.stdout, output
    assert (tmp_path / "out" / "demo_flux.png").is_file()
