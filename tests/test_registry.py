"""Model files: round trip, versions never overwritten, corrupt / truncated / mismatched files, registry."""

from __future__ import annotations

import json

import pytest
import torch

from napari_unetpp import UNetPlusPlus
from napari_unetpp.errors import ModelFileError
from napari_unetpp.model.card import ModelCard
from napari_unetpp.model.registry import list_models, load_model, save_model
from napari_unetpp.paths import shipped_weights_dir, user_models_dir

from .conftest import tiny_net as tiny


def card(name="mine", **kw) -> ModelCard:
    return ModelCard(name=name, architecture={}, **kw)


def test_round_trip_is_exact_and_versions_increment():
    m = tiny()
    p1 = save_model(m, card(scores={"L1": {"dice": 0.5}}, recommended_depth=1))
    p2 = save_model(tiny(seed=1), card(parent="mine@v1"))
    assert p1.name == "mine-v1.json" and p2.name == "mine-v2.json" and p1.parent == user_models_dir() / "mine"
    newest = load_model("mine")
    assert newest.card.version == 2 and newest.card.parent == "mine@v1"
    first = load_model("mine@v1")
    assert first.card.recommended_depth == 1 and first.card.scores["L1"]["dice"] == 0.5
    for (k, a), b in zip(m.state_dict().items(), first.module.state_dict().values()):
        assert torch.equal(a, b), k
    x = torch.randn(1, 1, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(first.module(x)[-1], m(x)[-1])
    assert [r.id for r in list_models() if not r.shipped] == ["mine@v1", "mine@v2"]


def test_saving_never_overwrites(tmp_path):
    save_model(tiny(), card("fixed"), directory=tmp_path)
    before = (tmp_path / "fixed.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="never overwritten"):
        save_model(tiny(seed=3), card("fixed"), directory=tmp_path)
    assert (tmp_path / "fixed.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed.json", "fixed.safetensors"]


def test_fp16_storage_restores_fp32(tmp_path):
    torch.manual_seed(0)
    m = UNetPlusPlus(features=(16, 32, 64), norm="batch").eval()
    path = save_model(m, card("half"), directory=tmp_path, storage_dtype="float16")
    save_model(m, card("full"), directory=tmp_path)
    assert (tmp_path / "half.safetensors").stat().st_size < 0.55 * (tmp_path / "full.safetensors").stat().st_size
    lm = load_model(path)
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(lm.module(x)[-1], m(x)[-1], atol=2e-2, rtol=1e-2)
    assert lm.card.weights_dtype == "float16"
    assert all(p.dtype == torch.float32 for p in lm.module.parameters())


def test_truncated_weights_are_reported_with_the_file_name(tmp_path):
    path = save_model(tiny(), card("broken"), directory=tmp_path)
    w = tmp_path / "broken.safetensors"
    w.write_bytes(w.read_bytes()[:200])
    with pytest.raises(ModelFileError, match="broken.safetensors.*corrupt or truncated"):
        load_model(path)
    # without a checksum in the card, safetensors itself rejects the file
    d = json.loads(path.read_text())
    d["weights_sha256"] = ""
    path.write_text(json.dumps(d))
    with pytest.raises(ModelFileError, match="broken.safetensors.*corrupt or truncated"):
        load_model(path)


def test_mismatched_architecture_is_reported(tmp_path):
    path = save_model(tiny(), card("mismatch"), directory=tmp_path)
    d = json.loads(path.read_text())
    d["architecture"]["features"] = [4, 8, 16]
    path.write_text(json.dumps(d))
    with pytest.raises(ModelFileError, match="do not match the architecture.*wrong shape"):
        load_model(path)


def test_bad_card_missing_files_and_unknown_names(tmp_path):
    path = save_model(tiny(), card("badcard"), directory=tmp_path)
    path.write_text("{not json")
    with pytest.raises(ModelFileError, match="badcard.json.*unreadable"):
        load_model(tmp_path / "badcard.safetensors")
    (tmp_path / "lonely.safetensors").write_bytes(b"x")
    with pytest.raises(ModelFileError, match="card is missing"):
        load_model(tmp_path / "lonely.safetensors")
    with pytest.raises(ModelFileError, match="no model named 'nope'"):
        load_model("nope")
    with pytest.raises(ModelFileError, match="no version 7"):
        save_model(tiny(), card("exists"))
        load_model("exists@v7")
    with pytest.raises(ValueError, match="may use only"):
        save_model(tiny(), card("bad name/x"))


def test_weights_load_without_pickle(tmp_path):
    """A pickle file renamed to .safetensors is refused, never unpickled."""
    path = save_model(tiny(), card("pickled"), directory=tmp_path)
    torch.save(tiny().state_dict(), tmp_path / "pickled.safetensors")
    d = json.loads(path.read_text())
    d["weights_sha256"] = ""
    path.write_text(json.dumps(d))
    with pytest.raises(ModelFileError, match="corrupt or truncated"):
        load_model(path)


def test_shipped_model_is_found_and_described():
    assert (shipped_weights_dir() / "em-membranes.safetensors").is_file()
    rows = {r.id: r for r in list_models()}
    em = rows["em-membranes@v1"]
    assert em.shipped and em.card.classes == ["membrane"]
    assert set(em.card.scores) == {"L1", "L2", "L3", "L4"} and 1 <= em.card.recommended_depth <= 4
    assert "Cardona" in " ".join(em.card.training["citations"])
    assert load_model("em-membranes").shipped and load_model("em-membranes@v1").shipped


def test_dotted_names_save_list_and_load_every_version(tmp_path):
    """A name with dots ("em.v2", as typed in "save as" or `train --out`) is one name: every version is listed and
    loadable under it, and the second save does not hang (with_suffix on the stem once cut the name at its dot)."""
    save_model(tiny(), card("em.v2"))
    p2 = save_model(tiny(seed=1), card("em.v2"))
    assert p2 == user_models_dir() / "em.v2" / "em.v2-v2.json"
    assert sorted(f.name for f in p2.parent.iterdir()) == [
        "em.v2-v1.json",
        "em.v2-v1.safetensors",
        "em.v2-v2.json",
        "em.v2-v2.safetensors",
    ]
    assert [r.id for r in list_models() if not r.shipped] == ["em.v2@v1", "em.v2@v2"]
    assert load_model("em.v2").card.version == 2 and load_model("em.v2@v1").card.version == 1
    assert load_model("em.v2@v2").path == p2.with_name("em.v2-v2.safetensors")
    assert load_model(p2).card.id == "em.v2@v2"  # by path: the weights beside this card, not em.safetensors
    # an explicit folder (how shipped models are made): <name>.safetensors/.json, and never overwritten
    q = save_model(tiny(), card("nuclei-v1.1"), directory=tmp_path)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["nuclei-v1.1.json", "nuclei-v1.1.safetensors"]
    assert load_model(q).card.name == "nuclei-v1.1"
    with pytest.raises(FileExistsError, match="never overwritten"):
        save_model(tiny(), card("nuclei-v1.1"), directory=tmp_path)


@pytest.mark.parametrize("name", ["em.json", "em.safetensors", "em@v2", "a/b", ".hidden", "", "em."])
def test_names_that_cannot_be_loaded_back_are_refused_before_saving(name):
    with pytest.raises(ValueError, match="model name"):
        save_model(tiny(), card(name))
    assert not user_models_dir().exists() or not any(user_models_dir().iterdir())


def test_a_save_gives_up_instead_of_looping_forever(monkeypatch):
    """If every version number seems taken (a file system that reports every name as existing), the save stops with
    a one-sentence error after a bounded number of tries."""
    from napari_unetpp.model import registry

    calls = []

    def taken(src, dst):
        calls.append(dst)
        if len(calls) > 100_000:
            raise AssertionError("save_model keeps trying")
        raise FileExistsError(dst)

    monkeypatch.setattr(registry, "publish", taken)
    with pytest.raises(FileExistsError, match="could not claim a version number"):
        save_model(tiny(), card("busy"))
    assert len(calls) <= 10_000


@pytest.mark.parametrize("text", ["[1, 2]", '"a card"', "3", "null"])
def test_a_card_that_is_not_a_json_object_is_a_model_file_error(tmp_path, text):
    path = save_model(tiny(), card("odd"), directory=tmp_path)
    path.write_text(text)
    with pytest.raises(ModelFileError, match="odd.json.*invalid"):
        load_model(path)


def test_calibration_is_kept_in_memory_or_read_beside_the_weights(tmp_path, caplog, monkeypatch):
    """A model's int8 calibration tiles: those set in memory (right after fine-tuning, saved or not), else the file
    saved beside its weights (moved there once, readable by all), else none; a damaged file is logged and reads as
    none."""
    import os
    from pathlib import Path

    import numpy as np

    from napari_unetpp.model.files import calibration_path
    from napari_unetpp.model.loaded import LoadedModel

    tiles = np.random.default_rng(0).random((2, 1, 16, 16)).astype(np.float16)
    fresh = LoadedModel.from_module(tiny())
    assert fresh.calibration is None
    fresh.calibration = tiles
    np.testing.assert_array_equal(fresh.calibration, tiles)
    moves, real_replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (moves.append(Path(b)), real_replace(a, b))[1])
    back = load_model(save_model(tiny(), card("cal"), directory=tmp_path, calibration=tiles))
    monkeypatch.setattr(os, "replace", real_replace)
    np.testing.assert_array_equal(back.calibration, tiles)
    # written in the saving folder and moved once, beside the weights (nothing moved within the saving folder)
    assert moves.count(calibration_path(back.path)) == 1 and all(m.parent == tmp_path for m in moves)
    assert calibration_path(back.path).stat().st_mode & 0o777 == 0o644
    assert load_model(save_model(tiny(), card("none"), directory=tmp_path)).calibration is None
    calibration_path(back.path).write_bytes(b"not safetensors")
    assert back.calibration is None and "could not read" in caplog.text
