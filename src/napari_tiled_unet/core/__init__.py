"""Compute core: numpy, torch, tifffile, scipy and scikit-image only (never napari or Qt)."""
