"""napari dock widgets (magicgui Containers). The only package that imports napari, Qt or magicgui."""
