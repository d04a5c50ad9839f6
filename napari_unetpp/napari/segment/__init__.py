"""The "UNet++ Segment" dock widget: a Qt-free controller (:mod:`.controller`: planes, result keys, zoom, statistics,
model and window, channel), what a result looks like on screen (:mod:`.shown`, Qt-free), the layer writer
(:mod:`.layers`), the thread-worker jobs (:mod:`.jobs`), the controls and their choices (:mod:`.controls`) and the
widget that wires them (:mod:`.widget`).

Nothing is imported here, so ``napari_unetpp.napari.segment.controller`` imports without Qt or napari.
"""
