"""The ``napari-unetpp`` command line: ``app`` holds the parser and :func:`main`; each command has a module of its
own (``predict``, ``train``, ``models``, ``export``, ``demo``), sharing ``args`` (checked argument types, the
error a command reports) and ``progress`` (the bars on stderr); ``labels`` holds train's checks of the labels."""

from napari_unetpp.cli.app import main

__all__ = ["main"]
