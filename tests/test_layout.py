"""The repository's shape: one import name in the wheel, and a layer contract that names every package."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import hansgate

ROOT = Path(__file__).resolve().parents[1]


def _contract_layers() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in config["contracts"] if c["type"] == "layers")["layers"]
    return [name.strip() for layer in layers for name in layer.replace("|", ":").split(":")]


def test_every_module_of_the_package_sits_in_a_layer():
    """A new subpackage or top-level module must be placed in the drawing, or the contract would not see it."""
    named = set(_contract_layers())
    package = Path(hansgate.__file__).parent
    children = {p.stem for p in package.glob("*.py") if p.stem != "__init__"}
    children |= {p.name for p in package.iterdir() if (p / "__init__.py").is_file()}
    assert {f"hansgate.{c}" for c in children} == named


def test_top_level_folders_are_the_subpackages():
    for name in ("refinement", "audit", "service"):
        assert (ROOT / name).resolve() == (ROOT / "hansgate" / name).resolve()
        assert (ROOT / name / "__init__.py").is_file()


def test_the_wheel_installs_one_top_level_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("hansgate-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"hansgate"}
    for sub in ("refinement/egem.py", "audit/runner.py", "service/service.py", "nn/hooks.py",
                "service/prometheus/rules.yml", "service/templates/compliance.html", "audit/templates/report.html.j2"):
        assert f"hansgate/{sub}" in names
