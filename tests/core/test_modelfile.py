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


def _crafted(path, header, tensors=None):
    from safetensors.numpy import save_file

    save_file(tensors or {"x": np.zeros(1, np.float32)}, str(path), metadata=header)
    return path


def _header(**changes):
    import json

    header = {
        "format": "napari-tiled-unet/1",
        "config": json.dumps({"depth": 4, "base_channels": 256}),
        "normalization": json.dumps({"mode": "none"}),
        "metadata": "{}",
    }
    header.update(changes)
    return {k: v for k, v in header.items() if v is not None}


@pytest.mark.parametrize(
    "changes, match",
    [
        ({}, "do not match its config .* missing"),  # a header claiming 2 GB
        ({"config": None}, "has no 'config' entry"),
        ({"config": "{not json"}, "'config' entry .* is not valid JSON"),
        (
            {"config": "[" * 200000 + "]" * 200000},
            "'config' entry .* is not valid JSON|must be an object",
        ),
        ({"config": '{"depth": "four"}'}, "describes no valid model .*depth"),
        ({"config": '{"depth": 3, "colour": 1}'}, "describes no valid model .*unknown fields"),
        ({"config": "[1, 2]"}, "'config' entry .* must be an object, got list"),
        ({"normalization": '{"mode": "zscore"}'}, "describes no valid model .*normalization mode"),
    ],
)
def test_malformed_or_lying_headers_get_one_clear_error(changes, match, tmp_path):
    path = _crafted(tmp_path / "bad.safetensors", _header(**changes))
    with pytest.raises(ValueError, match=match):
        load_model(path)


def test_nan_weights_are_refused(tmp_path):
    import torch

    model = make_model(depth=2)
    with torch.no_grad():
        model.head.bias[0] = float("nan")
    save_model(model, tmp_path / "nan.safetensors")
    with pytest.raises(ValueError, match="NaN or infinite weights .*head.bias"):
        load_model(tmp_path / "nan.safetensors")


def test_a_new_model_predicts_the_same_before_and_after_a_round_trip(tmp_path, rng):
    """One declared record (normalisation, metadata), no fallbacks that differ between the
    engine and the file."""
    from napari_tiled_unet.core.predict import predict_array

    model = make_model(depth=2, base_channels=4, seed=7)
    image = (rng.random((60, 70)) * 1000).astype(np.float32)  # far from [0, 1]: scaling shows
    before = predict_array(model, image)
    loaded = load_model(save_model(model, tmp_path / "m.safetensors"))
    np.testing.assert_array_equal(predict_array(loaded, image), before)
    assert loaded.normalization == model.normalization == Normalization("none")
    assert loaded.metadata == model.metadata == {}
