"""Real annotated nuclei images (see PROVENANCE.md), installed as ``napari_tiled_unet.sample_data``."""
