"""Property-based checks (hypothesis): tiling equivalence over random shapes, dtypes, axes and tile sizes, and the
CLI's handling of bad input (one sentence, no traceback, nothing written)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from napari_unetpp import UNetPlusPlus, predict
from napari_unetpp.cli.app import main
from napari_unetpp.inference.tiling import source_index

torch.manual_seed(0)
NET = UNetPlusPlus(features=(4, 8, 8), norm="batch").eval()  # depth 2: planes padded to multiples of 4


@settings(max_examples=25, deadline=None)
@given(size=st.integers(1, 40), before=st.integers(0, 30), after=st.integers(0, 30), edge=st.booleans())
def test_lazy_tile_reads_equal_numpy_pad(size, before, after, edge):
    x = np.arange(size)
    ref = np.pad(x, (before, after), mode="edge" if edge or size == 1 else "reflect")
    got = x[source_index(slice(0, size + before + after), before, size, edge)]
    np.testing.assert_array_equal(got, ref)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    h=st.integers(5, 70),
    w=st.integers(5, 70),
    lead=st.integers(1, 2),
    dtype=st.sampled_from(["uint8", "uint16", "int16", "float32"]),
    tile=st.integers(40, 64),
    seed=st.integers(0, 2**16),
)
def test_tiled_equals_untiled_on_random_images(h, w, lead, dtype, tile, seed):
    """The depth-1 network's receptive field is 18 px (one pixel moves the outputs from 8 px before it to 9 after),
    and tiles of 40-64 px overlapping by half (20 px at least) give every pixel a tile holding all of it, so the
    blended result equals the whole-plane one but for the say of other tiles' borders: at most 2.2e-3 of mean
    absolute error in 110 random cases (up to 0.2 at single pixels: where the Gaussian weights' floor gives two tiles
    equal say, at seams on the image's border; with 3/4 overlap more tiles have a border near each pixel and it
    reached 1.1e-2). A tile written one pixel off gave 0.05 or more, an output cropped one pixel off 0.09 or more,
    so the bound of 5e-3 tells them apart at any shape and dtype (the correlation > 0.9 checked before also let
    blending with flat weights through: 4e-3 to 2e-2 here)."""
    rng = np.random.default_rng(seed)
    img = (rng.random((lead, h, w)) * 200).astype(dtype)
    kw = dict(axes="ZYX", depth=1, precision="fp32", prob_dtype="float32", runtime="torch")  # tiling, not runtimes
    whole = predict(img, NET, tile=512, **kw)
    tiled = predict(img, NET, tile=tile, overlap=0.5, **kw)
    a, b = whole.probabilities[1], tiled.probabilities[1]
    assert a.shape == b.shape == (lead, h, w)
    assert np.isfinite(b).all()
    assert np.abs(a - b).mean() < 5e-3


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bad")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=6).map(tuple),
    axes=st.one_of(st.none(), st.text("TCZYXQ", min_size=1, max_size=6)),
    nan=st.booleans(),
)
def test_cli_bad_input_is_one_sentence_and_writes_nothing(bad_dir, capsys, shape, axes, nan):
    img = np.ones(shape, np.float32)
    if nan:
        img.flat[0] = np.nan
    src, out = bad_dir / "in.tif", bad_dir / "out.tif"
    tifffile.imwrite(src, img)
    out.unlink(missing_ok=True)
    argv = ["predict", str(src), "-o", str(out), "--model", "em-membranes", "--device", "cpu", "-q", "--depth", "1"]
    code = main(argv + (["--axes", axes] if axes else []))
    err = capsys.readouterr().err
    if code == 0:  # a valid small image: written, and nothing else
        assert out.exists() and not nan
        return
    assert code == 2, err
    assert err.startswith("napari-unetpp: error:") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and not out.exists()
    assert not list(bad_dir.glob(".*.partial"))
