"""Loading user models without unpickling, and the built-ins."""

from __future__ import annotations

import pickle

import numpy as np

import pytest
import torch
from safetensors.torch import save_file

from hansgate.errors import ModelLoadError
from hansgate.nn.models import (
    BUILTIN_MODELS,
    build_builtin,
    load_model,
    source_sha256,
    state_dict_sha256,
)

FACTORY = "tests.refinement._factory:tiny"


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_builtins_run_on_digits(name):
    assert build_builtin(name)(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    assert load_model(f"builtin:{name}").training is False


def test_factory_with_safetensors_and_state_dict(tmp_path):
    ref = load_model(FACTORY)
    save_file(ref.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    assert _same(load_model(FACTORY, tmp_path / "w.safetensors"), ref)
    assert _same(load_model(FACTORY, tmp_path / "w.pt"), ref)
    assert state_dict_sha256(load_model(FACTORY, tmp_path / "w.pt")) == state_dict_sha256(ref)


def test_pickled_objects_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"weight": Evil()}, fh)
    with pytest.raises(ModelLoadError, match="weights_only"):
        load_model(FACTORY, path)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_and_torchvision(tmp_path):
    scripted = torch.jit.script(load_model(FACTORY))
    scripted.save(str(tmp_path / "m.ts"))
    m = load_model(f"torchscript:{tmp_path / 'm.ts'}")
    x = torch.rand(2, 1, 2, 2)
    assert torch.allclose(m(x), scripted(x))
    assert load_model("torchvision:resnet18", num_classes=4)(torch.rand(1, 3, 32, 32)).shape == (1, 4)


@pytest.mark.parametrize(("spec", "weights", "match"), [
    ("nosuch_pkg.mod:f", None, "cannot import"),
    ("tests.refinement._factory:not_a_model", None, "not a torch.nn.Module"),
    ("builtin:nope", None, "unknown built-in"),
    ("torchvision:not_an_arch", None, "unknown torchvision"),
    ("torchscript:/does/not/exist.ts", None, "not found"),
    ("what is this", None, "cannot parse"),
    (FACTORY, "/does/not/exist.safetensors", "not found"),
])
def test_bad_specs_give_one_clear_error(spec, weights, match):
    with pytest.raises(ModelLoadError, match=match):
        load_model(spec, weights)


def test_weights_that_do_not_fit(tmp_path):
    save_file({"1.weight": torch.zeros(5, 5)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ModelLoadError, match="do not fit"):
        load_model(FACTORY, tmp_path / "w.safetensors")


def test_state_dict_hash_covers_zero_dim_buffers():
    model = build_builtin("small_resnet")  # BatchNorm: 0-dim num_batches_tracked
    assert any(t.dim() == 0 for t in model.state_dict().values())
    digest = state_dict_sha256(model)
    assert digest == state_dict_sha256(model.state_dict()) and len(digest) == 64
    model.bn1.num_batches_tracked += 1  # a 0-dim buffer is part of the identity
    assert state_dict_sha256(model) != digest
    flags = {"b": torch.tensor(True), "h": torch.ones(2, dtype=torch.float16)}
    assert state_dict_sha256(flags) != state_dict_sha256({"b": torch.tensor(False), "h": flags["h"]})


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_source_hash_is_one_identity_across_formats(tmp_path):
    ref = build_builtin("small_resnet")
    save_file(ref.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    expected = state_dict_sha256(ref)
    for weights in (tmp_path / "w.safetensors", tmp_path / "w.pt"):
        loaded = load_model("small_resnet", weights)
        assert source_sha256("small_resnet", weights, loaded) == expected
    plain = load_model(FACTORY)
    torch.jit.script(plain).save(str(tmp_path / "m.ts"))
    spec = f"torchscript:{tmp_path / 'm.ts'}"
    assert source_sha256(spec, None, load_model(spec)) == state_dict_sha256(plain)


def test_a_pickle_as_weights_is_refused_in_one_line(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"weight": Evil()}, fh)
    with pytest.raises(ModelLoadError) as info:
        load_model(FACTORY, path)
    message = str(info.value)
    assert "\n" not in message and "weights_only=False" not in message and "refused" in message
    from hansgate.cli import main

    np.savez(tmp_path / "d.npz", x=np.zeros((10, 1, 2, 2), np.float32), y=np.arange(10) % 2)
    assert main(["refine", "--model", FACTORY, "--weights", str(path), "--data", str(tmp_path / "d.npz"),
                 "--out", str(tmp_path / "b"), "--quiet"]) == 2
    out = capsys.readouterr()
    assert "pwned" not in out.out and len(out.err.strip().splitlines()) == 1 and "refused" in out.err


@pytest.mark.parametrize(("spec", "match"), [("json:dumps", "failed when called without arguments: TypeError"),
                                              ("json:__name__", "not a model factory")])
def test_a_callable_that_is_not_a_model_factory_is_one_error(spec, match):
    with pytest.raises(ModelLoadError, match=match) as info:
        load_model(spec)
    assert "\n" not in str(info.value)
