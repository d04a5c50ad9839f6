"""The house rules of the package's layout, as ``scripts/check_layout.py`` checks them: every module at most 400
lines, no import circle (imports inside functions count), no private name imported from another module."""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_layout", ROOT / "scripts" / "check_layout.py")
assert _spec is not None and _spec.loader is not None
check_layout = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_layout)


def test_the_package_keeps_the_house_rules(capsys):
    code = check_layout.main(["--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and out.strip() == "layout: ok", out


def test_the_check_fails_on_a_long_module_a_circle_and_a_private_import(tmp_path, monkeypatch, capsys):
    """A package with each fault: a module of 401 lines, two modules importing each other (one of them inside a
    function), one importing the other's private name. Each is named; ``--allow`` lets the long one pass."""
    pkg = tmp_path / "napari_unetpp"
    (pkg / "a").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a/__init__.py": "",
        "a/x.py": "from napari_unetpp.a.y import shown\n\n_hidden = 1\n",
        "a/y.py": """
            def shown():
                from napari_unetpp.a.x import _hidden

                return _hidden
            """,
        "big.py": "x = 1\n" * 401,
        "fine.py": "from napari_unetpp.a.y import shown\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(textwrap.dedent(text).lstrip())
    monkeypatch.setattr(check_layout, "ROOT", tmp_path)
    monkeypatch.setattr(check_layout, "PKG", pkg)
    assert check_layout.main(["--quiet"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "circle: napari_unetpp.a.x <-> napari_unetpp.a.y",
        "private import: napari_unetpp.a.y:2 imports napari_unetpp.a.x._hidden",
        "too long: napari_unetpp.big has 401 lines (limit 400)",
        "layout: BROKEN",
    ]
    assert check_layout.main(["--quiet", "--allow", "napari_unetpp.big=401"]) == 1
    assert "too long" not in capsys.readouterr().out
    (pkg / "a" / "y.py").write_text("def shown():\n    return 1\n")  # the circle and the private import mended
    assert check_layout.main(["--quiet", "--allow", "napari_unetpp.big=401"]) == 0
    assert capsys.readouterr().out.strip() == "layout: ok"
