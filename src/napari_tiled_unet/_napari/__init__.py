"""napari widgets and sample data: the only place napari, magicgui and Qt are imported."""
