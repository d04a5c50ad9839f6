"""Many files, and scale-out on dask.distributed: the same outputs as one process."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_unetpp.batch.distributed import parse_scheduler
from napari_unetpp.batch.files import PredictOptions, expand_inputs, output_for
from napari_unetpp.cli.app import main
from napari_unetpp.errors import InputError
from napari_unetpp.io.images import read_image, write_image

pytest.importorskip("zarr")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The cluster ``--scheduler local:2`` starts, started once for the module's distributed tests (its workers
    import everything and load each model once) and given to the CLI by address. Its workers get their own models
    and cache folders. No client of it stays the default dask scheduler, so the single-process runs the tests
    compare with read their zarr inputs in this process, as they would alone."""
    distributed = pytest.importorskip("distributed")
    from napari_unetpp.batch.distributed import local_cluster

    with pytest.MonkeyPatch.context() as mp:  # what the workers inherit when they start
        mp.setenv("NAPARI_UNETPP_HOME", str(tmp_path_factory.mktemp("worker-home")))
        mp.setenv("NAPARI_UNETPP_CACHE", str(tmp_path_factory.mktemp("worker-cache")))
        cluster = local_cluster(2)
    try:
        with distributed.Client(cluster, set_as_default=False) as client:
            assert len(client.scheduler_info()["workers"]) == 2
        yield cluster.scheduler_address
    finally:
        cluster.close()


@pytest.fixture
def em_files(tmp_path, em_crop):
    d = tmp_path / "in"
    d.mkdir()
    for i, plane in enumerate(em_crop):
        tifffile.imwrite(d / f"slice{i}.tif", plane)
    (d / "notes.txt").write_text("not an image")
    return d


def test_inputs_from_a_folder_a_glob_and_names(em_files, tmp_path):
    names = [p.name for p in expand_inputs(str(em_files))]
    assert names == ["slice0.tif", "slice1.tif", "slice2.tif"]
    assert [p.name for p in expand_inputs(str(em_files / "slice[12].tif"))] == ["slice1.tif", "slice2.tif"]
    with pytest.raises(InputError, match="no image matches"):
        expand_inputs(str(tmp_path / "*.nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no images"):
        expand_inputs(str(tmp_path / "empty"))
    assert output_for(em_files / "a.ome.tif", tmp_path, objects=False).name == "a_mask.tif"
    assert output_for(em_files / "ct.nii.gz", tmp_path, objects=True).name == "ct_objects.nii.gz"
    assert output_for(em_files / "s.zarr", tmp_path, objects=False, fmt=".tif").name == "s_mask.tif"


def test_scheduler_specs():
    assert parse_scheduler(None) == ("none", None)
    assert parse_scheduler("local:3") == ("local", 3)
    assert parse_scheduler("tcp://10.0.0.1:8786") == ("address", "tcp://10.0.0.1:8786")
    for bad in ("local:0", "local:x", "slurm"):
        with pytest.raises(ValueError):
            parse_scheduler(bad)


def test_cli_many_files_writes_one_output_each_and_goes_on_past_a_bad_one(em_files, tmp_path, em_crop, capsys):
    tifffile.imwrite(em_files / "broken.tif", np.zeros((0, 5), np.uint8))
    out = tmp_path / "out"
    assert main(["predict", str(em_files), "-o", str(out), "--depth", "1", "-q"]) == 1  # one input failed
    captured = capsys.readouterr()
    assert "broken.tif" in captured.err and "1 of 4 inputs failed" in captured.out
    for i in range(3):
        single = tmp_path / f"single{i}.tif"
        assert main(["predict", str(em_files / f"slice{i}.tif"), "-o", str(single), "--depth", "1", "-q"]) == 0
        np.testing.assert_array_equal(tifffile.imread(out / f"slice{i}_mask.tif"), tifffile.imread(single))
    # the output may not overwrite an input, and a file is no output folder
    assert main(["predict", str(em_files / "slice0.tif"), "-o", str(em_files / "slice0.tif"), "-q"]) == 2
    assert main(["predict", str(em_files), "-o", str(em_files / "slice0.tif"), "-q"]) == 2


@pytest.mark.slow
def test_distributed_files_and_a_split_stack_equal_one_process(em_files, tmp_path, em_crop, cluster):
    """LocalCluster with 2 workers: files as tasks, and one OME-Zarr stack split into blocks of planes (objects
    numbered on across blocks), give exactly the single-process outputs."""
    stack = write_image(tmp_path / "stack.zarr", np.concatenate([em_crop, em_crop[::-1]]), "ZYX")
    common = ["--depth", "2", "-q", "--precision", "fp32"]
    assert main(["predict", str(em_files), "-o", str(tmp_path / "d"), "--scheduler", cluster, *common]) == 0
    assert main(["predict", str(em_files), "-o", str(tmp_path / "s"), *common]) == 0
    for i in range(3):
        a = tifffile.imread(tmp_path / "d" / f"slice{i}_mask.tif")
        np.testing.assert_array_equal(a, tifffile.imread(tmp_path / "s" / f"slice{i}_mask.tif"))
    dist = tmp_path / "dist.zarr"
    args = [str(stack), "--objects", "watershed", *common]
    assert main(["predict", *args, "-o", str(dist), "--scheduler", cluster, "--block", "2"]) == 0
    assert main(["predict", *args, "-o", str(tmp_path / "one.zarr")]) == 0
    a, b = np.asarray(read_image(dist).data), np.asarray(read_image(tmp_path / "one.zarr").data)
    assert a.max() > 100 and np.abs(a.astype(np.int64) - b).max() == 0


@pytest.mark.slow
def test_one_volume_and_one_plane_split_by_rows_equal_one_process(tmp_path, em_crop, cluster):
    """A single 3D volume (a small 3D UNet++) and a single plane are split into blocks of rows along their first
    spatial axis; each block runs the tiles of the whole tile plan that touch its rows: the masks equal a single
    process's exactly. (Probabilities agree to float rounding: a worker runs torch on its share of the cores, and
    convolutions on another thread count round differently; in one process a row block is bit-identical, see
    test_prediction.)"""
    import torch

    from napari_unetpp.model.loaded import LoadedModel
    from napari_unetpp.model.network import UNetPlusPlus
    from napari_unetpp.model.registry import save_model

    torch.manual_seed(0)
    lm = LoadedModel.from_module(UNetPlusPlus(features=(4, 8, 16), spatial_dims=3), name="tiny3d")
    card = save_model(lm.module, lm.card, directory=tmp_path)
    rng = np.random.default_rng(0)
    vol = write_image(tmp_path / "vol.zarr", rng.integers(0, 255, (24, 32, 40), dtype=np.uint8), "ZYX")
    plane = write_image(tmp_path / "plane.zarr", em_crop[0], "YX")
    # blocks of rows (the plane's 0/40/80/120) that do not start where tiles do (0/48/97): each runs its tiles
    for src, model, tile, block in ((vol, str(card), "16", "8"), (plane, "em-membranes", "64", "40")):
        common = [str(src), "--model", model, "-q", "--precision", "fp32", "--all-levels", "--tile", tile]
        dist, one = tmp_path / f"d-{src.stem}.zarr", tmp_path / f"o-{src.stem}.zarr"
        assert main(["predict", *common, "-o", str(dist), "--scheduler", cluster, "--block", block]) == 0
        assert main(["predict", *common, "-o", str(one)]) == 0
        a, b = np.asarray(read_image(dist).data), np.asarray(read_image(one).data)
        assert a.shape == b.shape and a.any() and np.array_equal(a, b), src.stem
        for suffix in ("_L1", "_L2"):
            a = np.asarray(read_image(dist.with_name(dist.stem + suffix + ".zarr")).data, np.float32)
            b = np.asarray(read_image(one.with_name(one.stem + suffix + ".zarr")).data, np.float32)
            bad = np.nonzero(np.abs(a - b).reshape(a.shape[0], -1).max(1) > 2e-3)[0]
            assert np.abs(a - b).max() < 2e-3, (src.stem, suffix, bad[:20], len(bad), a.shape)


def test_unreachable_scheduler_and_what_a_split_cannot_do(tmp_path, em_crop, capsys):
    src = write_image(tmp_path / "plane.zarr", em_crop[0], "YX")
    args = ["predict", str(src), "-o", str(tmp_path / "m.zarr"), "--scheduler", "tcp://127.0.0.1:9"]
    assert main([*args, "--objects", "watershed"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be split into objects" in err
    from napari_unetpp.batch.distributed import predict_stack_distributed

    czyx = write_image(tmp_path / "czyx.zarr", np.stack([em_crop, em_crop]), "CZYX")
    with pytest.raises(InputError, match="put C before the stack axis"):
        predict_stack_distributed(czyx, tmp_path / "m.zarr", "em-membranes", PredictOptions(channel=0), "local:1")
    stack = write_image(tmp_path / "stack.zarr", em_crop, "ZYX")
    assert main(["predict", str(stack), "-o", str(tmp_path / "m.zarr"), "--scheduler", "tcp://127.0.0.1:9"]) == 2
    assert "cannot reach the dask scheduler at tcp://127.0.0.1:9" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing half-written left
