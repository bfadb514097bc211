"""Refinement units and rebuilding a refined model from its source, its recipe and its state dict."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hansgate.errors import ConfigError, ModelLoadError
from hansgate.nn.models import build_builtin
from hansgate.nn.surgery import insert_after
from hansgate.nn.units import (
    PROJECTION_POOLINGS,
    UNIT_KINDS,
    ClarcProjection,
    ExposureScale,
    PcaExposure,
    UnsupportedUnit,
    build_unit,
    inserted_units,
    load_state_bytes,
    project_along,
    rebuild,
    refined_weights,
    skeleton,
    state_bytes,
    state_views,
    strip_units,
    unit_options,
)


def _refined(seed: int = 0) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    source = build_builtin("small_resnet", num_classes=3, in_channels=3, image_size=16).eval()
    refined = build_builtin("small_resnet", num_classes=3, in_channels=3, image_size=16).eval()
    refined.load_state_dict(source.state_dict())
    g = torch.Generator().manual_seed(seed + 1)
    d = 16
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    insert_after(refined, {"layer1": PcaExposure(torch.rand(d, generator=g), basis, torch.rand(d, generator=g), 64,
                                                 "ratio"),
                           "layer1.inner.0": ExposureScale(torch.rand(16, generator=g)),
                           "layer2": PcaExposure(torch.rand(32, generator=g), torch.eye(32, dtype=torch.float64),
                                                 torch.rand(32, generator=g), 16, "linear")})
    with torch.no_grad():
        refined.fc.inner.weight.add_(0.1) if hasattr(refined.fc, "inner") else refined.fc.weight.add_(0.1)
    return source, refined.eval(), torch.rand(4, 3, 16, 16, generator=g)


def test_manifest_kinds_are_the_rebuildable_units():
    from typing import get_args

    from hansgate.manifest import UnitKind

    assert set(get_args(UnitKind)) == set(UNIT_KINDS)


def test_refinement_re_exports_the_same_classes():
    from hansgate.refinement import clarc, clarc_core, egem, pca

    assert egem.ExposureScale is ExposureScale and pca.PcaExposure is PcaExposure and egem.PcaExposure is PcaExposure
    assert clarc.ClarcProjection is ClarcProjection and clarc_core.ClarcProjection is ClarcProjection
    assert clarc.project_along is project_along


def test_rebuild_from_source_recipe_and_state_is_exact():
    source, refined, x = _refined()
    units = inserted_units(refined)
    assert [(n, k) for n, k, _ in units] == [("layer1", "pca_exposure"), ("layer1.inner.0", "exposure_scale"),
                                             ("layer2", "pca_exposure")]
    state = load_state_bytes(state_bytes(refined))
    assert state["bn1.num_batches_tracked"].dim() == 0
    rebuilt = rebuild(source, units, state)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), refined(x))
    assert not any("refiner" in k for k in source.state_dict())  # the source is not changed
    stripped = strip_units(refined)
    assert set(stripped.state_dict()) == set(source.state_dict())
    assert refined_weights(refined, x) is not None


def test_state_that_does_not_fit_is_one_error():
    source, refined, _ = _refined()
    units = inserted_units(refined)
    state = refined.state_dict()
    with pytest.raises(ModelLoadError, match="Missing key"):
        rebuild(source, units, {k: v for k, v in state.items() if k != "layer2.refiner.mean"})
    with pytest.raises(ModelLoadError, match="size mismatch"):
        rebuild(source, units, {**state, "layer2.refiner.mean": torch.zeros(5)})
    with pytest.raises(ModelLoadError, match="no layer 'nope'"):
        rebuild(source, [("nope", "exposure_scale", {"shape": [3]})], state)
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_state_bytes(b"not safetensors")


@pytest.mark.parametrize("kind, options, needle", [
    ("pickle", {}, "unknown refinement unit kind"),
    ("exposure_scale", {"shape": []}, "shape"),
    ("exposure_scale", {"shape": [True]}, "shape"),
    ("pca_exposure", {"dim": 3, "spatial_size": 1, "conv_mode": "cubic", "per_element": False}, "conv_mode"),
    ("pca_exposure", {"dim": 0, "spatial_size": 1, "conv_mode": "ratio", "per_element": False}, "dim"),
    ("clarc_projection", {"dim": 3, "pooling": "median"}, "pooling"),
    ("clarc_projection", {"dim": 0, "pooling": "max"}, "dim"),
    ("clarc_projection", {"pooling": "max"}, "dim"),
])
def test_bad_unit_options_are_refused(kind, options, needle):
    with pytest.raises(ModelLoadError, match=needle):
        build_unit(kind, options)


def test_an_unrecordable_inserted_module_gives_no_refined_weights():
    _, refined, x = _refined()
    insert_after(refined, {"fc": nn.Identity()})
    with pytest.raises(UnsupportedUnit):
        unit_options(nn.Identity())
    assert refined_weights(refined, x) is None


def test_empty_units_take_loaded_buffers():
    unit = PcaExposure(torch.rand(4), torch.eye(4, dtype=torch.float64), torch.rand(4), 9, "ratio", True)
    kind, options = unit_options(unit)
    empty = build_unit(kind, options)
    empty.load_state_dict(unit.state_dict())
    a = torch.rand(2, 4)
    assert torch.equal(empty(a), unit(a)) and options == {"dim": 4, "spatial_size": 9, "conv_mode": "ratio",
                                                          "per_element": True}


def test_skeleton_holds_no_weights_and_rebuild_assigns_the_loaded_tensors():
    source, refined, x = _refined()
    bare = skeleton(refined)
    assert all(t.is_meta for t in bare.state_dict().values())
    assert not any(t.is_meta for t in refined.state_dict().values())  # the model itself is untouched
    state = load_state_bytes(state_bytes(refined))
    rebuilt = rebuild(strip_units(bare), inserted_units(refined), state, assign=True)
    assert rebuilt.get_submodule("conv1").weight.data_ptr() == state["conv1.weight"].data_ptr()  # no copy
    with torch.no_grad():
        assert torch.equal(rebuilt(x), refined(x))
    with pytest.raises(ModelLoadError, match="Missing key"):
        rebuild(strip_units(bare), inserted_units(refined),
                {k: v for k, v in state.items() if k != "layer2.refiner.mean"}, assign=True)


def test_state_bytes_saves_tied_tensors_and_views_as_their_values():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight  # tied
    model.register_buffer("view", torch.arange(10.0)[2:6])  # a view into a larger storage
    state = load_state_bytes(state_bytes(model))
    assert torch.equal(state["0.weight"], state["1.weight"]) and torch.equal(state["view"], torch.arange(2.0, 6.0))
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v)


def test_state_bytes_are_the_safetensors_file_byte_for_byte():
    from safetensors.torch import save

    _, refined, _ = _refined()
    refined.register_buffer("flags", torch.tensor([True, False, True]))
    refined.register_buffer("codes", torch.arange(5, dtype=torch.uint8))
    refined.register_buffer("wide", torch.rand(3, dtype=torch.float64))
    refined.register_buffer("halves", torch.rand(2, dtype=torch.float16))
    refined.register_buffer("none", torch.zeros(0, 2))
    want = save({k: v.detach().clone().contiguous() for k, v in refined.state_dict().items()})
    assert bytes(state_bytes(refined)) == want


def test_state_views_read_the_same_tensors_as_safetensors_without_copying():
    _, refined, _ = _refined()
    refined.register_buffer("empty", torch.zeros(0, 3))
    refined.register_buffer("flag", torch.tensor([True, False]))
    data = state_bytes(refined)
    views, loaded = state_views(data), load_state_bytes(data)
    assert set(views) == set(loaded)
    for k, v in loaded.items():
        assert views[k].dtype == v.dtype and torch.equal(views[k], v)
    big = max(views.values(), key=lambda t: t.numel())
    start = np.frombuffer(data, np.uint8).ctypes.data
    assert start <= big.data_ptr() < start + len(data)  # a view into the bytes, not a copy
    with pytest.raises(ModelLoadError, match="safetensors"):
        state_views(b"\x08" + bytes(7) + b"not json")


@pytest.mark.parametrize("pooling, expected", [
    # a = [[1, 3], [0, 2]] (2 channels, 2 positions), h = [1, 1], z = 0
    ("mean", [[-0.5, 1.5], [-1.5, 0.5]]),  # pool = [2, 1], length 3, gamma = -3 / 2
    ("max", [[-1.5, 0.5], [-2.5, -0.5]]),  # pool = [3, 2], length 5, gamma = -5 / 2
    ("none", [[-0.5, 3.0], [0.0, 0.5]]),   # h = [1, 0, 0, 1] over the map, length 3, gamma = -3 / 2
])
def test_projection_is_eq3_in_closed_form(pooling, expected):
    """Paper 001, Eq. 3 by hand: ``a' = a + (z - pool(a) . h) / (h . h) * lift(h)``."""
    a = torch.tensor([[[1.0, 3.0], [0.0, 2.0]]])
    h = torch.tensor([1.0, 0.0, 0.0, 1.0]) if pooling == "none" else torch.tensor([1.0, 1.0])
    unit = ClarcProjection(h, 0.0, pooling)
    assert torch.equal(unit(a), torch.tensor([expected]))
    assert torch.equal(unit(a), project_along(a, h, 0.0, pooling))
    flat = ClarcProjection(torch.tensor([0.0, 2.0]), 1.0, pooling)  # [N, D]: length 4, gamma = -3 / 4
    assert torch.equal(flat(torch.tensor([[1.0, 2.0]])), torch.tensor([[1.0, 0.5]]))


def test_projection_pools_as_the_cav_was_fitted():
    """The unit's pooling is ``concepts.cav``'s (it cannot import it: ``concepts`` sits above ``nn``)."""
    from hansgate.concepts.cav import POOLINGS, lift_cav, pool_channels

    assert PROJECTION_POOLINGS == POOLINGS
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    for pooling in POOLINGS:
        h = torch.randn(100 if pooling == "none" else 4, generator=g, dtype=torch.float64)
        z = 0.3
        gamma = (z - pool_channels(a, pooling) @ h) / (h @ h)
        want = a + gamma.view(3, 1, 1, 1) * lift_cav(h, a, pooling)
        assert torch.allclose(project_along(a, h, z, pooling), want, atol=1e-12)
    with pytest.raises(ConfigError, match="pooling"):
        ClarcProjection(torch.ones(4), 0.0, "median")
    with pytest.raises(ConfigError, match="CAV"):
        ClarcProjection(torch.ones(2, 2), 0.0, "max")


@pytest.mark.parametrize("pooling", ["max", "mean", "none"])
def test_projection_unit_rebuilds_to_the_refined_module(pooling):
    """A P-ClArC model: recipe ``(layer, "clarc_projection", {dim, pooling})``, CAV and target in the state dict."""
    torch.manual_seed(0)
    source = build_builtin("small_resnet", num_classes=3, in_channels=3, image_size=16).eval()
    refined = build_builtin("small_resnet", num_classes=3, in_channels=3, image_size=16).eval()
    refined.load_state_dict(source.state_dict())
    g = torch.Generator().manual_seed(1)
    dim = 16 * 16 * 16 if pooling == "none" else 16  # layer1's output: 16 channels at 16 x 16
    insert_after(refined, {"layer1": ClarcProjection(torch.randn(dim, generator=g), 0.25, pooling)})
    x = torch.rand(4, 3, 16, 16, generator=g)
    units = inserted_units(refined)
    assert units == [("layer1", "clarc_projection", {"dim": dim, "pooling": pooling})]
    state = load_state_bytes(state_bytes(refined))
    assert state["layer1.refiner.target"].dim() == 0 and float(state["layer1.refiner.target"]) == 0.25
    rebuilt = rebuild(source, units, state)
    with torch.no_grad():
        out, want = rebuilt(x), refined(x)
        assert torch.equal(out, want) and not torch.allclose(want, source(x))
    assert refined_weights(refined, x) is not None  # rebuilt on a weightless skeleton too
    with pytest.raises(ModelLoadError, match="size mismatch"):
        rebuild(source, [("layer1", "clarc_projection", {"dim": dim + 1, "pooling": pooling})], state)
