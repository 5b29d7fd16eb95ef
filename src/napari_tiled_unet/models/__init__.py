"""Models shipped with the package (weights as package data; see MODEL_CARD.md)."""

from pathlib import Path

#: The bundled default nuclei model: what ``tiled-unet segment`` and the Segment widget use
#: unless told otherwise.
DEFAULT_MODEL = Path(__file__).resolve().with_name("default.safetensors")
