"""What napari's plugin manager installs is the wheel: it must carry everything the manifest uses."""

import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_the_manifest_model_and_sample_data(tmp_path):
    # A copy without earlier build output, which could otherwise leak into the wheel.
    source = tmp_path / "source"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv*",
            "build",
            "dist",
            "*.egg-info",
            "__pycache__",
            ".pytest_cache",
            ".hypothesis",
            "bench_data",
            ".tox",
        ),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(tmp_path),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("napari_tiled_unet-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = Parser().parsestr(
            archive.read(next(n for n in names if n.endswith("METADATA"))).decode()
        )
        entry_points = archive.read(
            next(n for n in names if n.endswith("entry_points.txt"))
        ).decode()
        manifest = yaml.safe_load(archive.read("napari_tiled_unet/napari.yaml"))
    package = "napari_tiled_unet/"
    assert {package + "models/default.safetensors", package + "models/MODEL_CARD.md"} <= names
    sample_files = {
        f"{package}sample_data/nuclei_{k}_{kind}.tif" for k in "abc" for kind in ("image", "labels")
    }
    assert sample_files | {package + "sample_data/PROVENANCE.md"} <= names
    modules = {c["python_name"].split(":")[0] for c in manifest["contributions"]["commands"]}
    assert all(package + m.split(".", 1)[1].replace(".", "/") + ".py" in names for m in modules)
    assert "napari-tiled-unet = napari_tiled_unet:napari.yaml" in entry_points
    assert "Framework :: napari" in metadata.get_all("Classifier")
    assert metadata["Summary"].startswith("Segment nuclei and cells in napari")
    assert metadata["License-Expression"] == "BSD-3-Clause"
    assert metadata.get_payload().startswith("# napari-tiled-unet")  # README as the hub page
    assert not [
        r
        for r in metadata.get_all("Requires-Dist")
        if r.lower().startswith(("pyqt", "pyside", "napari")) and "extra ==" not in r
    ]
