"""U-Net segmentation for microscopy with exact overlap-tile inference.

Importing the package is cheap: it does not import torch, napari or Qt.
"""

__version__ = "0.1.0"
