"""The napari side: the dock widgets (:mod:`.segment`, :mod:`.finetune`), the reader, samples and demo. The only
package that imports napari, Qt or magicgui; its Qt-free parts (``segment.controller``, ``segment.shown``,
``finetune.edits``, ``finetune.pair``, ``cache``, ``events``, ``pixel_size``) are tested without a viewer."""
