"""Griffe extension for the API pages: the lazily imported public names of ``napari_unetpp``.

``napari_unetpp/__init__.py`` imports its public names on first use (``__getattr__`` over the ``_EXPORTS`` table),
so a static reading of the package does not see them. This extension reads that table and adds each name as an
alias of the object it points at, so the docs can say ``::: napari_unetpp.predict`` and keep working when the
modules behind the names move. It also turns the docstrings' Sphinx roles (``:func:`x```) into code spans.
"""

from __future__ import annotations

import ast
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj):`(~?)([^`]+)`")


def _code_span(match: re.Match[str]) -> str:
    target = match.group(2)
    return f"`{target.rsplit('.', 1)[-1]}`" if match.group(1) else f"`{target}`"


class LazyExports(griffe.Extension):
    """Add ``napari_unetpp``'s ``_EXPORTS`` as members, and render Sphinx roles as code."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.path != "napari_unetpp" or "_EXPORTS" not in pkg.members:
            return
        exports = ast.literal_eval(str(pkg["_EXPORTS"].value))
        for name, module in exports.items():
            pkg.set_member(name, griffe.Alias(name, f"{module}.{name}", parent=pkg))

    on_package_loaded = on_package  # the same hook under its name in griffe < 1.14 (unused by newer ones)

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(_code_span, obj.docstring.value)
