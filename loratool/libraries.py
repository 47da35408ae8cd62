"""Optional libraries that other libraries import eagerly, kept out of the runs that do not use them."""

from __future__ import annotations

import sys


def without_bitsandbytes() -> None:
    """Mark bitsandbytes absent for this process, unless something already loaded it.

    peft imports bitsandbytes whenever it is installed, and bitsandbytes then logs "Failed to load CPU
    gemm_4bit_forward from kernels-community" on CPUs with AVX512-BF16 (and takes ~1.4 s to import). A `None`
    entry in sys.modules makes `import bitsandbytes` raise ImportError and `importlib.util.find_spec` return
    None, which peft, diffusers and transformers all read as "not installed".
    """
    sys.modules.setdefault("bitsandbytes", None)


def with_bitsandbytes() -> None:
    """Undo `without_bitsandbytes` for a quantised option; before diffusers is imported (it checks once)."""
    if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
        del sys.modules["bitsandbytes"]
