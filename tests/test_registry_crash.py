"""Crash safety of the model registry: a save killed at any point never leaves a version that breaks loading."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from napari_unetpp.errors import ModelFileError
from napari_unetpp.model import registry
from napari_unetpp.model.card import ModelCard
from napari_unetpp.model.files import pair
from napari_unetpp.model.registry import list_models, load_model, save_model
from napari_unetpp.paths import user_models_dir

from .conftest import tiny_net as tiny


def test_a_crash_between_weights_and_card_leaves_the_previous_version_loadable(monkeypatch):
    save_model(tiny(), ModelCard(name="mine", architecture={}))
    real = registry.publish

    def crash_on_card(src, dst):
        if dst.suffix == ".json":
            raise KeyboardInterrupt  # the process dies after the weights landed, before the card
        real(src, dst)

    monkeypatch.setattr(registry, "publish", crash_on_card)
    with pytest.raises(KeyboardInterrupt):
        save_model(tiny(seed=1), ModelCard(name="mine", architecture={}))
    monkeypatch.setattr(registry, "publish", real)
    folder = user_models_dir() / "mine"
    assert (folder / "mine-v2.safetensors").exists() and not (folder / "mine-v2.json").exists()
    assert load_model("mine").card.version == 1
    assert [r.id for r in list_models() if not r.shipped] == ["mine@v1"]
    # the next save skips the number the crashed one took, and becomes the newest
    p = save_model(tiny(seed=2), ModelCard(name="mine", architecture={}))
    assert p.name == "mine-v3.json" and load_model("mine").card.version == 3


def test_an_empty_card_from_an_interrupted_save_is_skipped():
    save_model(tiny(), ModelCard(name="mine", architecture={}))
    folder = user_models_dir() / "mine"
    (folder / "mine-v2.safetensors").write_bytes(b"")
    (folder / "mine-v2.json").write_text("")  # claimed by an exclusive create, never filled
    assert load_model("mine").card.version == 1
    assert save_model(tiny(seed=1), ModelCard(name="mine", architecture={})).name == "mine-v3.json"


def test_save_without_hard_links(monkeypatch):
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    p1 = save_model(tiny(), ModelCard(name="fat", architecture={}))
    p2 = save_model(tiny(seed=1), ModelCard(name="fat", architecture={}))
    assert (p1.name, p2.name) == ("fat-v1.json", "fat-v2.json")
    for ref, got in ((tiny(), load_model("fat@v1")), (tiny(seed=1), load_model("fat@v2"))):
        for a, b in zip(ref.state_dict().values(), got.module.state_dict().values()):
            assert torch.equal(a, b)
    assert sorted(p.name for p in (user_models_dir() / "fat").iterdir()) == [
        "fat-v1.json",
        "fat-v1.safetensors",
        "fat-v2.json",
        "fat-v2.safetensors",
    ]


def test_stale_saving_folders_are_removed_and_fresh_ones_kept():
    folder = user_models_dir() / "mine"
    folder.mkdir(parents=True)
    stale, fresh = folder / ".saving-old", folder / ".saving-now"
    for d in (stale, fresh):
        d.mkdir()
        (d / "w.safetensors").write_bytes(b"partial")
    old = time.time() - 2 * registry.STALE_SAVE_SECONDS
    os.utime(stale, (old, old))
    save_model(tiny(), ModelCard(name="mine", architecture={}))
    assert not stale.exists() and fresh.exists()


def test_a_folder_named_like_a_model_does_not_shadow_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "em-membranes").mkdir()
    assert load_model("em-membranes").shipped
    (tmp_path / "mine").mkdir()
    with pytest.raises(ModelFileError, match="no model named 'mine'.*path with the .safetensors"):
        load_model("mine")
    with pytest.raises(ModelFileError, match="ends in .safetensors or .json"):
        load_model("./mine")
    save_model(tiny(), ModelCard(name="here", architecture={}), directory=tmp_path)
    assert load_model("here.json").card.name == "here" and load_model("./here.safetensors").card.name == "here"


# Imports torch and the registry once, then forks one saver per line on stdin: each saver builds the network (after
# the fork: a process forked after torch has computed may hang in OpenMP) and saves versions back to back until it
# is killed; it says "ready <pid>" when its first save starts, and the server "dead" once it has reaped it. A fresh
# interpreter per kill spent most of the test importing torch.
_SAVERS = r"""
import os, sys
import torch
from napari_unetpp.model.card import ModelCard
from napari_unetpp.model.network import UNetPlusPlus
from napari_unetpp.model.registry import save_model

def save_forever():
    torch.manual_seed(0)
    net = UNetPlusPlus(features=(4, 8, 8), norm="batch").eval()
    print("ready", os.getpid(), flush=True)
    i = 0
    while True:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.01)
        save_model(net, ModelCard(name="crash", architecture={}, description=str(i)),
                   storage_dtype="float16" if i % 2 else "float32")
        i += 1

for _ in sys.stdin:
    pid = os.fork()
    if pid == 0:
        try:
            save_forever()
        finally:
            os._exit(1)
    os.waitpid(pid, 0)
    print("dead", flush=True)
"""


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="kills savers with SIGKILL, forked on POSIX")
def test_saves_killed_at_random_points_never_break_the_registry():
    """SIGKILL a process that saves versions back to back, at random times, many times over; after each kill every
    version the registry lists loads, and ``load_model(name)`` gives the newest listed one. A version already loaded
    after an earlier kill is checked by its bytes instead (unchanged files load as they did: loading every version
    again after every kill was most of the test's time)."""
    rng = np.random.default_rng(0)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    server = subprocess.Popen(
        [sys.executable, "-c", _SAVERS], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True
    )
    assert server.stdin is not None and server.stdout is not None
    loaded: dict[str, bytes] = {}  # id -> its card and weights as they were when they loaded
    try:
        for _ in range(6):
            server.stdin.write("go\n")
            server.stdin.flush()
            ready, pid = server.stdout.readline().split()
            assert ready == "ready"
            time.sleep(float(rng.uniform(0.05, 0.6)))
            os.kill(int(pid), signal.SIGKILL)
            assert server.stdout.readline().strip() == "dead"  # reaped: nothing of it runs on
            rows = [r for r in list_models() if r.name == "crash"]
            assert set(loaded) <= {r.id for r in rows}  # nothing that was complete disappears
            for r in rows:
                files = b"".join(f.read_bytes() for f in pair(r.path))
                if r.id in loaded:
                    assert files == loaded[r.id], f"{r.id} changed after it was complete"
                    continue
                assert load_model(r.id).card.id == r.id
                loaded[r.id] = files
            if rows:
                assert load_model("crash").card.version == max(r.version for r in rows)
    finally:
        server.kill()
        server.wait()
        server.stdin.close()
        server.stdout.close()
    assert len(loaded) > 6  # the savers got through many versions between kills
