"""Shared fixtures: real ISBI 2012 crops (tests/data), tiny models, an isolated user model folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile

DATA = Path(__file__).parent / "data"
os.environ.setdefault("NAPARI_UNETPP_SYNC", "1")


@pytest.fixture(scope="session")
def _session_cache(tmp_path_factory) -> Path:
    """One cache folder for the whole run (exported graphs, int8 copies, measured runtime choices): the caches are
    keyed by the weights' hash, so sharing them is what a user's machine does too, and it spares every test a
    re-export and a re-measurement. Tests about the caches themselves point ``NAPARI_UNETPP_CACHE`` elsewhere."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _isolated_user_models(tmp_path_factory, monkeypatch, _session_cache):
    """Every test gets its own user-model folder, so nothing a test saves leaks into another (or the user's); the
    caches are shared by the session (see ``_session_cache``)."""
    monkeypatch.setenv("NAPARI_UNETPP_HOME", str(tmp_path_factory.mktemp("home")))
    monkeypatch.setenv("NAPARI_UNETPP_CACHE", str(_session_cache))


@pytest.fixture
def own_cache(tmp_path_factory, monkeypatch) -> Path:
    """A cache folder for this test alone (for tests that count exports, corrupt caches or measure choices)."""
    path = tmp_path_factory.mktemp("own_cache")
    monkeypatch.setenv("NAPARI_UNETPP_CACHE", str(path))
    return path


@pytest.fixture(autouse=True)
def _pytorch_unless_a_runtime_test(request, monkeypatch):
    """Outside tests marked ``runtimes``, ``runtime="auto"`` means PyTorch: measuring ONNX Runtime and OpenVINO on
    every first batch (and compiling an OpenVINO model per test) was most of the suite's time, and what it checks
    belongs to the runtime tests. Asking for a runtime by name still runs it."""
    if request.node.get_closest_marker("runtimes"):
        return
    from napari_unetpp.runtimes import selection

    def torch_only(net, depth, precision="fp32"):
        return [], ["only PyTorch runs outside the runtime tests"]

    monkeypatch.setattr(selection, "_usable", torch_only)


@pytest.fixture(autouse=True)
def _fp32_unless_a_bf16_test(request, monkeypatch):
    """``precision="auto"`` means fp32 in tests on every CPU, so the suite computes the same on a CPU with native
    bf16 as without: oneDNN's bf16 results depend on the batch (a slice previewed alone against the same slice in a
    stack run differed in 0.3 % of an untrained network's mask pixels), and many tests compare such runs exactly.
    bf16 is tested where it is asked for (``precision="bf16"``) and in tests marked ``bf16``, which see the CPU as
    it is or pretend it has native bf16 (tests/test_bf16_runtimes.py)."""
    if request.node.get_closest_marker("bf16"):
        return
    from napari_unetpp.runtimes import device, selection

    monkeypatch.setattr(device, "cpu_supports_bf16", lambda: False)
    monkeypatch.setattr(selection, "cpu_supports_bf16", lambda: False)


@pytest.fixture(autouse=True)
def _fresh_runtime_failures(monkeypatch):
    """A runtime that failed in one test (e.g. a deliberately broken ONNX export) is not held against it in the
    next: the process-wide record of failed runtimes starts empty in each test."""
    import sys

    failures = sys.modules.get("napari_unetpp.runtimes.failures")
    if failures is not None:
        monkeypatch.setattr(failures, "_FAILED", {})


@pytest.fixture(scope="session")
def em_crop() -> np.ndarray:
    """3 x 161 x 187 uint8 crop of ISBI 2012 validation slices 25-27 (odd sizes on purpose)."""
    return tifffile.imread(DATA / "isbi_val_crop.tif")


@pytest.fixture(scope="session")
def em_crop_membrane() -> np.ndarray:
    """Membrane mask (1 = membrane) matching :func:`em_crop`."""
    return tifffile.imread(DATA / "isbi_val_crop_labels.tif")


@pytest.fixture(scope="session")
def em_model():
    """The shipped EM membrane model."""
    from napari_unetpp import load_model

    return load_model("em-membranes")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2 * (a & b).sum() / s)


def tiny_batchnorm(depth: int = 2, seed: int = 0, norm: str = "batch"):
    """A tiny untrained UNet++ of ``depth`` levels (features 8, 16, 32, ...) with batch norm (or ``norm``), as a
    LoadedModel named ``tiny`` (seeded, in train mode): what the fine-tuning tests train."""
    import torch

    from napari_unetpp.model.loaded import LoadedModel
    from napari_unetpp.model.network import UNetPlusPlus

    torch.manual_seed(seed)
    return LoadedModel.from_module(UNetPlusPlus(features=(8, 16, 32, 64, 128)[: depth + 1], norm=norm), name="tiny")


def tiny_net(seed: int = 0, **kw):
    """A tiny untrained UNet++ (seeded, in eval mode): 2 levels of features 4, 8, 8 with batch norm unless ``kw``
    (any ``UNetPlusPlus`` argument) says otherwise; for tests of files, runtimes and prediction."""
    import torch

    from napari_unetpp.model.network import UNetPlusPlus

    torch.manual_seed(seed)
    kw.setdefault("features", (4, 8, 8))
    kw.setdefault("norm", "batch")
    return UNetPlusPlus(**kw).eval()


def tiny_loaded(seed: int = 0, **kw):
    """:func:`tiny_net` as a LoadedModel (the card of an unsaved model)."""
    from napari_unetpp.model.loaded import LoadedModel

    return LoadedModel.from_module(tiny_net(seed, **kw))
