"""Keep triton out of a napari process whose OpenGL is Mesa's LLVM-based renderer.

Mesa's software renderer (llvmpipe, used on VMs and remote desktops) links its own libLLVM. The
CUDA build of torch loads triton, which links another LLVM, when the first optimizer step runs;
with both in one process napari crashed (segfault) on pressing Train (issue 14 #1). Without
triton, torch still trains and predicts: ``torch.compile`` falls back to the plain network.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

_MESA_LLVM = re.compile(r"libLLVM|swrast_dri|llvmpipe|libgallium")


def keep_triton_out(maps: str | None = None) -> bool:
    """Block ``import triton`` in this process when Mesa's LLVM is loaded in it.

    Parameters
    ----------
    maps : str, optional
        The process's memory map (``/proc/self/maps``); read when not given.

    Returns
    -------
    bool
        True when triton is blocked now or was already.
    """
    if "triton" in sys.modules:
        return sys.modules["triton"] is None
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:  # not Linux: no Mesa/LLVM clash seen there
            return False
    if not _MESA_LLVM.search(maps):
        return False
    sys.modules["triton"] = None  # import triton now raises ImportError; find_spec gives None
    return True
