import subprocess
import sys


def test_importing_the_package_and_cli_does_not_import_torch_or_qt():
    code = (
        "import sys, napari_tiled_unet, napari_tiled_unet.cli;"
        "heavy = [m for m in ('torch', 'napari', 'qtpy', 'PyQt5', 'magicgui') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""
