"""The atomic writes: the partial names each writer uses, and the permissions of what they leave (caches private,
outputs and model files as a plain write makes them)."""

from __future__ import annotations

import re
import stat

import numpy as np
import pytest

from napari_unetpp.io import images
from napari_unetpp.paths import usual_mode


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_outputs_are_written_under_partial_names_and_get_a_plain_files_mode(tmp_path, monkeypatch):
    """TIFF ``.<name>.<random>.partial``, NIfTI ``.<name>.<random>.partial.nii.gz`` (nibabel compresses by the
    ending), OME-Zarr a ``.<name>.<random>.partial`` folder; the outputs get a plain file's mode, and a replaced
    file keeps its own."""
    pytest.importorskip("nibabel")
    pytest.importorskip("zarr")
    made = []
    real = images.partial_beside
    monkeypatch.setattr(images, "partial_beside", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    from napari_unetpp.io import zarr as zarr_io

    monkeypatch.setattr(zarr_io, "partial_beside", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    data = np.arange(2 * 16 * 16, dtype=np.uint8).reshape(2, 16, 16)
    kept = tmp_path / "kept.tif"
    kept.write_bytes(b"the user's file")
    kept.chmod(0o640)
    names = ["m.tif", "v.nii.gz", "o.zarr", "kept.tif"]
    images.write_images([(tmp_path / n, data, "ZYX", None) for n in names])
    rand = r"[A-Za-z0-9_]+"
    patterns = [rf"\.m\.tif\.{rand}\.partial", rf"\.v\.nii\.gz\.{rand}\.partial\.nii\.gz"]
    patterns += [rf"\.o\.zarr\.{rand}\.partial", rf"\.kept\.tif\.{rand}\.partial"]
    assert len(made) == 4 and not any(p.exists() for p in made)
    for p, want in zip(made, patterns):
        assert re.fullmatch(want, p.name), p.name
    assert _mode(tmp_path / "m.tif") == _mode(tmp_path / "v.nii.gz") == usual_mode(tmp_path / "new")
    assert _mode(kept) == 0o640  # replacing a file keeps its mode


def test_cache_files_stay_private_and_calibration_is_readable(tmp_path, monkeypatch):
    """Exported graphs, int8 copies and runtime choices are private (0600, as the cache always was); a model's
    calibration tiles (beside its weights, shared like them) are 0644."""
    from napari_unetpp.model.files import save_calibration
    from napari_unetpp.runtimes import choices
    from napari_unetpp.runtimes.base import written_atomically

    monkeypatch.setattr(choices, "_CHOICES", {})  # this process's choices: the test's own
    monkeypatch.setenv("NAPARI_UNETPP_CACHE", str(tmp_path / "cache"))
    graph = tmp_path / "cache" / "onnx" / "g.onnx"
    written_atomically(graph, lambda tmp: tmp.write_bytes(b"graph"), "the ONNX export")
    assert graph.read_bytes() == b"graph" and _mode(graph) == 0o600
    choices.decide("a key", 1, "1x16x16", {"torch": 1.0, "onnx": 2.0})  # saved to runtime_choices.json
    assert _mode(tmp_path / "cache" / "runtime_choices.json") == 0o600
    save_calibration(np.zeros((2, 1, 16, 16), np.float32), tmp_path / "m-v2.calibration.safetensors")
    assert _mode(tmp_path / "m-v2.calibration.safetensors") == 0o644
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [
        "g.onnx",
        "m-v2.calibration.safetensors",
        "runtime_choices.json",
    ]  # no partial file left
