"""The registry: every method name maps to one refiner, the CLI's choices and help come from it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from hansgate.cli import build_parser, main
from hansgate.errors import ConfigError
from hansgate.refinement import registry
from hansgate.refinement.methods import METHODS
from hansgate.refinement.refiners import ClarcRefiner, PruningRefiner, RefineData, Refiner, RefinerConfig, XSRefiner

EXPECTED = {"egem": PruningRefiner, "pca-egem": PruningRefiner, "rgem": PruningRefiner, "ridge": PruningRefiner,
            "retrain": PruningRefiner, "p-clarc": ClarcRefiner, "a-clarc": ClarcRefiner, "rr-clarc": ClarcRefiner,
            "rrr": XSRefiner, "rbr": XSRefiner, "tap": XSRefiner, "none": XSRefiner}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_name_maps_to_one_refiner(name):
    refiner = registry.get_refiner(name)
    assert isinstance(refiner, EXPECTED[name]) and isinstance(refiner, Refiner)
    assert refiner.name == name and refiner.family == registry.ENTRIES[name].family
    assert refiner.summary and "\n" not in refiner.summary


def test_families_partition_the_names():
    assert registry.names() == list(EXPECTED)
    assert registry.names("pruning") == list(METHODS)  # every pruning implementation is registered, in order
    assert registry.names("concept") == ["p-clarc", "a-clarc", "rr-clarc"]
    assert registry.names("xs") == ["rrr", "rbr", "tap", "none"]
    assert sorted(registry.names("pruning", "concept", "xs")) == sorted(EXPECTED)


@pytest.mark.parametrize("name, families", [("nope", ()), ("rrr", ("pruning", "concept")), ("egem", ("xs",))])
def test_unknown_name_is_one_clear_error(name, families):
    with pytest.raises(ConfigError, match=f"unknown refinement method '{name}'; choose from") as info:
        registry.get_refiner(name, *families)
    assert "\n" not in str(info.value)
    for allowed in registry.names(*families):
        assert allowed in str(info.value)


def test_a_name_registers_once_and_a_class_refuses_another_family():
    with pytest.raises(ConfigError, match="already registered"):
        registry.register("egem", "pruning", "again", "hansgate.refinement.refiners:PruningRefiner")
    with pytest.raises(ConfigError, match="family"):
        ClarcRefiner(registry.ENTRIES["egem"])


def test_help_lists_every_method_of_each_command(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # no wrapping inside hyphenated names
    parser = build_parser()
    for command, option, family in (("refine", "  --method METHOD", ("pruning", "concept")),
                                    ("train", "  --xs {rrr,rbr,tap,none}", ("xs",))):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        text = capsys.readouterr().out
        start = text.index("\n" + option) + 1
        line = " ".join(text[start:text.index("\n  -", start)].split())
        for name in registry.names(*family):
            assert f"{name}: " in line, (command, name)
        for name in set(registry.names()) - set(registry.names(*family)):
            assert f" {name}: " not in line, (command, name)


def test_building_the_command_line_imports_no_torch():
    code = "import sys; from hansgate.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_refine_with_an_unknown_or_xs_method_is_one_line(tmp_path, capsys):
    for method in ("nope", "tap"):
        assert main(["refine", "--model", "mnist_cnn", "--data", str(tmp_path / "x.npz"), "--method", method,
                     "--out", str(tmp_path / "b"), "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"unknown refinement method '{method}'" in err[0]


def test_fit_keeps_the_callers_model_and_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 3)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(40, 1, 2, 2)
    with torch.no_grad():
        y = model.eval()(x).argmax(1)
    model.train()
    data = RefineData(x, y, ["a", "b", "c"])
    for name in ("rgem", "ridge"):
        result = registry.get_refiner(name).fit(model, data, RefinerConfig())
        assert result.method == name and result.layers == ["4"]
        assert result.model is not model and not result.model.training
        assert model.training and all(m.training for m in model.modules())
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert result.selection.rule == "slack" and result.selection.chosen in result.selection.candidates


def test_concept_methods_need_a_concept():
    data = RefineData(torch.zeros(8, 1, 4, 4), torch.zeros(8, dtype=torch.long), ["a", "b"])
    with pytest.raises(ConfigError, match="needs at least one --concept"):
        registry.get_refiner("p-clarc").fit(nn.Flatten(), data)
