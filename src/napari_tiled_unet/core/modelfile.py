"""Model files: weights, architecture, input normalisation and metadata in one safetensors file.

Loading never executes code (safetensors holds tensors and a string-to-string header, nothing
else), and saving is atomic: a temporary file in the target folder is renamed over the target,
so a crash never leaves a half-written model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .config import UNetConfig
from .normalize import Normalization

if TYPE_CHECKING:
    from .model import UNet

FORMAT = "napari-tiled-unet/1"


def save_model(
    model: UNet, path, *, normalization: Normalization | None = None, metadata: dict | None = None
) -> Path:
    """Write ``model`` to ``path`` atomically.

    Parameters
    ----------
    model : UNet
    path : str or Path
        Target file (conventionally ``*.safetensors``); replaced if it exists.
    normalization : Normalization, optional
        Input normalisation; defaults to ``model.normalization`` (its record).
    metadata : dict, optional
        JSON-serialisable facts (training data, iterations, metrics); defaults to
        ``model.metadata``.

    Returns
    -------
    Path
    """
    from safetensors.torch import save_file

    path = Path(path)
    norm = normalization or model.normalization
    header = {
        "format": FORMAT,
        "config": json.dumps(model.config.to_dict()),
        "normalization": json.dumps(norm.to_dict()),
        "metadata": json.dumps(metadata if metadata is not None else model.metadata),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=header)
        os.chmod(
            tmp, 0o666 & ~_umask()
        )  # safetensors creates owner-only files; share like any file
        _fsync(tmp)  # on disk before it takes the name: a crash leaves the old model or the new
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _fsync(path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_header(path) -> dict:
    """The file's header (format, config, normalization, metadata) without loading weights
    (and without importing torch)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model: no such file: {path}")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            header = handle.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for foreign files
        raise ValueError(
            f"model: expected a napari-tiled-unet model file (safetensors), got {path} ({error})"
        ) from None
    if header.get("format") != FORMAT:
        raise ValueError(
            f"model: expected a napari-tiled-unet model file (format {FORMAT!r}), got {path} "
            f"with format {header.get('format')!r}"
        )
    return _parsed_header(header, path)


def _parsed_header(header: dict, path) -> dict:
    """Decode the JSON fields; any malformation is one clear ValueError."""
    parsed = {"format": header["format"]}
    for key, default in (("config", None), ("normalization", None), ("metadata", "{}")):
        text = header.get(key, default)
        if text is None:
            raise ValueError(f"model: the header of {path} has no {key!r} entry")
        try:
            value = json.loads(text)
        except (ValueError, RecursionError) as error:
            raise ValueError(
                f"model: the {key!r} entry in the header of {path} is not valid "
                f"JSON ({type(error).__name__})"
            ) from None
        if not isinstance(value, dict):
            raise ValueError(
                f"model: the {key!r} entry in the header of {path} must be an "
                f"object, got {type(value).__name__}"
            )
        parsed[key] = value
    try:
        UNetConfig.from_dict(parsed["config"])
        Normalization.from_dict(parsed["normalization"])
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"model: the header of {path} describes no valid model ({error})"
        ) from None
    return parsed


def tensor_shapes(path) -> dict[str, tuple[int, ...]]:
    """Name and shape of every tensor in a model file, read from its header (no weights, no
    torch)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118 (safe_open is not iterable)


def check_weights_match(config: UNetConfig, shapes: dict, path) -> None:
    """Raise ValueError unless the tensors named in a file's header are exactly those of a
    network of ``config``, with the same shapes. Uses torch's meta device: no memory is
    allocated, so a small header that claims a huge network costs nothing."""
    import torch

    from .model import UNet

    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in UNet(config).state_dict().items()}
    if expected != shapes:
        missing = sorted(set(expected) - set(shapes))
        extra = sorted(set(shapes) - set(expected))
        wrong = sorted(n for n in set(expected) & set(shapes) if expected[n] != shapes[n])
        raise ValueError(
            f"model: the weights in {path} do not match its config ({len(missing)} missing, "
            f"{len(extra)} unexpected, {len(wrong)} of another shape"
            f"{', e.g. ' + (missing + extra + wrong)[0] if missing or extra or wrong else ''})"
        )


def load_model(path) -> UNet:
    """Load a model file written by :func:`save_model`.

    Returns
    -------
    UNet
        In eval mode on the CPU, with ``normalization`` (:class:`Normalization`) and
        ``metadata`` (dict) attributes.
    """
    from safetensors.torch import load_file

    from .model import UNet

    header = read_header(path)
    config = UNetConfig.from_dict(header["config"])
    check_weights_match(config, tensor_shapes(path), path)  # before anything is allocated
    model = UNet(config)
    try:
        weights = load_file(str(path))
        model.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise ValueError(f"model: weights in {path} do not match its config: {error}") from None
    bad = [
        name
        for name, tensor in weights.items()
        if tensor.is_floating_point() and not bool(tensor.isfinite().all())
    ]
    if bad:
        raise ValueError(f"model: {path} holds NaN or infinite weights (in {', '.join(bad[:3])})")
    model.normalization = Normalization.from_dict(header["normalization"])
    model.metadata = header["metadata"]
    return model.eval()
