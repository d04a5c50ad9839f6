"""The "UNet++ Fine-tune" dock widget: which slices the user edited (:mod:`.edits`, Qt-free), the training pair
(:mod:`.pair`, Qt-free), the live plot (:mod:`.plot`) and the magicgui shell (:mod:`.widget`).

Nothing is imported here, so the Qt-free modules import without Qt or napari.
"""
