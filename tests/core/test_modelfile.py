import pickle

import numpy as np
import pytest
import torch

from napari_tiled_unet.core.modelfile import load_model, read_header, save_model
from napari_tiled_unet.core.normalize import Normalization

from ..conftest import make_model


def test_round_trip_keeps_weights_config_normalisation_and_metadata(tmp_path):
    model = make_model(depth=3, base_channels=4, in_channels=2, norm="batch")
    norm = Normalization("percentile", 2.0, 99.0)
    save_model(model, tmp_path / "m.safetensors", normalization=norm, metadata={"iterations": 7})
    loaded = load_model(tmp_path / "m.safetensors")
    assert loaded.config == model.config
    assert loaded.normalization == norm and loaded.metadata == {"iterations": 7}
    x = torch.rand(1, 2, 100, 100)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no temp file left


def test_pickles_and_foreign_files_are_refused_without_being_executed(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('code ran')",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Boom()))
    (tmp_path / "image.tif").write_bytes(b"II*\x00" + bytes(100))
    for name in ("evil.pt", "image.tif"):
        with pytest.raises(ValueError, match="model: expected a napari-tiled-unet model file"):
            load_model(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="model: no such file"):
        load_model(tmp_path / "missing.safetensors")


def test_safetensors_from_another_tool_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="format 'napari-tiled-unet/1'"):
        read_header(tmp_path / "other.safetensors")


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "m.safetensors"
    save_model(make_model(seed=1), target)
    before = target.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_model(make_model(seed=2), target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_saved_model_has_the_usual_file_permissions(tmp_path):
    import os

    previous = os.umask(0o022)
    try:
        path = save_model(make_model(depth=1, base_channels=2), tmp_path / "m.safetensors")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644
