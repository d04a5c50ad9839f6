"""The ``napari-unetpp`` command line (``app``: the parser and the commands); ``main`` runs it."""

from napari_unetpp.cli.app import main

__all__ = ["main"]
