"""Images streamed from disk (data.streaming): the same values as the eager load, whatever the selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from hansgate.data.datasets import load_labelled, open_labelled, save_npz
from hansgate.data.streaming import ArraySource, LazyImages, TensorSource, npz_array_source
from hansgate.errors import DataError
from hansgate.nn.normalisation import Normalised

N = 40


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The same 40 images as a compressed .npz, a stored float64 .npz and an ImageFolder of PNGs."""
    root = tmp_path_factory.mktemp("stream")
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(N, 3, 5, 7, generator=gen), torch.arange(N) % 3
    save_npz(root / "compressed.npz", x, y, ["a", "b", "c"])
    np.savez(root / "stored.npz", x=x.numpy().astype(np.float64), y=y.numpy())
    for c in "abc":
        (root / "folder" / c).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(N):
        Image.fromarray((rng.random((9, 11, 3)) * 255).astype(np.uint8)).save(root / "folder" / "abc"[i % 3] /
                                                                              f"{i:03d}.png")
    return root


KINDS = [("compressed.npz", {}), ("stored.npz", {}), ("folder", {"channels": 3, "size": (6, 8)})]


@pytest.mark.parametrize("name, kw", KINDS)
@pytest.mark.parametrize("workers", [0, 2])
def test_every_pass_equals_the_eager_load(files, name, kw, workers):
    eager = load_labelled(files / name, **kw)
    lazy = open_labelled(files / name, workers=workers, **kw)
    assert lazy.x.shape == eager.x.shape and torch.equal(lazy.y, eager.y) and lazy.classes == eager.classes
    assert torch.equal(torch.cat(list(lazy.x.iter_batches(7))), eager.x)
    assert torch.equal(lazy.x.take(slice(None)), eager.x)
    assert torch.equal(lazy.x[3], eager.x[3]) and torch.equal(lazy.x[-1], eager.x[-1])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_selections_match_the_tensor_for_any_slice_or_index_set(files, data):
    eager = load_labelled(files / "stored.npz").x
    lazy = open_labelled(files / "stored.npz", workers=0).x
    lazy.batch_limit = data.draw(st.integers(1, N), label="batch_limit")
    start, stop = data.draw(st.integers(-N, N)), data.draw(st.integers(-N, N))
    step = data.draw(st.integers(1, 5))
    assert torch.equal(lazy[start:stop:step], eager[start:stop:step])
    idx = torch.tensor(data.draw(st.lists(st.integers(0, N - 1), max_size=N)), dtype=torch.long)
    got = lazy[idx]
    if len(idx) > lazy.batch_limit:  # a split stays lazy and reads the same images later
        assert isinstance(got, LazyImages) and len(got) == len(idx)
        bs = data.draw(st.integers(1, N), label="batch")
        assert torch.equal(torch.cat(list(got.iter_batches(bs))), eager[idx])
        sub = data.draw(st.integers(0, len(idx)))
        assert torch.equal(got[:sub], eager[idx][:sub])  # views of views
    else:
        assert isinstance(got, torch.Tensor) and torch.equal(got, eager[idx])
    mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=N, max_size=N)))
    assert torch.equal(lazy.take(mask), eager[mask])


def test_transforms_match_the_models_normalisation(files):
    eager = load_labelled(files / "folder", channels=3, size=(6, 8)).x
    lazy = open_labelled(files / "folder", channels=3, size=(6, 8)).x
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    norm = lazy.normalised(mean, std)
    with torch.no_grad():
        expected = Normalised(torch.nn.Identity(), mean, std)(eager)
    assert torch.equal(norm.take(slice(None)), expected)
    assert torch.equal(lazy.scaled(255.0, 0.0)[2:9], eager[2:9] * 255.0)
    lo, hi = norm.bounds()
    assert lo == pytest.approx(-2.0) and hi == pytest.approx(3.0)


def test_npz_bounds_come_from_the_finiteness_pass(files):
    eager = load_labelled(files / "stored.npz").x
    lazy = open_labelled(files / "stored.npz").x
    assert lazy.bounds() == (float(eager.min()), float(eager.max()))


def test_a_stored_npz_is_read_in_place_and_a_compressed_one_unpacked_once(files):
    said: list[str] = []
    stored = npz_array_source(files / "stored.npz", log=said.append)
    assert stored.path == str(files / "stored.npz") and not said
    packed = npz_array_source(files / "compressed.npz", log=said.append)
    assert packed.path != str(files / "compressed.npz") and "compressed" in said[0]


def test_progress_bar_counts_images_per_second(files, capsys):
    lazy = open_labelled(files / "folder", channels=3, size=(6, 8), workers=0).x
    assert sum(len(b) for b in lazy.iter_batches(8, progress=True, desc="verify")) == N
    err = capsys.readouterr().err
    assert "verify" in err and "img/s" in err


def test_materialising_says_so():
    said: list[str] = []
    x = LazyImages(TensorSource(torch.rand(5, 1, 4, 4)))
    assert x.materialise(said.append, "because").shape == (5, 1, 4, 4)
    assert said and "all 5 images" in said[0] and "because" in said[0]


@pytest.mark.parametrize("key", [torch.rand(3), torch.zeros(2, 2, dtype=torch.long), torch.tensor([N]), 99,
                                 torch.zeros(N - 1, dtype=torch.bool)])
def test_bad_indices_raise_index_error(files, key):
    with pytest.raises(IndexError):
        open_labelled(files / "stored.npz").x[key]


def test_broken_files_are_one_data_error(tmp_path):
    np.savez(tmp_path / "nan.npz", x=np.full((3, 1, 2, 2), np.nan, np.float32), y=np.zeros(3, np.int64))
    with pytest.raises(DataError, match="NaN"):
        open_labelled(tmp_path / "nan.npz")
    np.savez(tmp_path / "f.npz", x=np.asfortranarray(np.zeros((3, 1, 2, 2), np.float32)), y=np.zeros(3, np.int64))
    with pytest.raises(DataError, match="Fortran"):
        open_labelled(tmp_path / "f.npz")
    np.savez(tmp_path / "ints.npz", x=np.zeros((3, 1, 2, 2), np.uint8), y=np.zeros(3, np.int64))
    with pytest.raises(DataError, match="float32"):
        open_labelled(tmp_path / "ints.npz")
    truncated = ArraySource(tmp_path / "f.npz", 10**6, np.dtype(np.float32), (3, 1, 2, 2))
    with pytest.raises(DataError, match="ends before"):
        truncated.read(np.array([0]))
