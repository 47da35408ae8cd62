"""Other libraries in a loratool run: optional ones that others import eagerly kept out of the runs that do
not use them, and the chatter of the rest kept off stderr."""

from __future__ import annotations

import logging
import os
import sys


def quiet() -> None:
    """What the CLI does before any verb, for a program that calls the Python API: transformers and diffusers
    at error level, accelerate, peft, httpx and the hub's loggers at ERROR, no hub progress bars, and
    bitsandbytes kept out (`without_bitsandbytes`). Otherwise a model load writes library warnings to stderr
    (torchvision image processors, the bitsandbytes CPU kernel) that say nothing about the run."""
    # transformers/diffusers reset their loggers on import, so quiet them through their own variables.
    for lib in ("TRANSFORMERS", "DIFFUSERS"):
        os.environ.setdefault(f"{lib}_VERBOSITY", "error")
        if lib.lower() in sys.modules:  # imported already (a program embedding us, the tests): the variable came late
            level = getattr(logging, os.environ[f"{lib}_VERBOSITY"].upper(), logging.ERROR)
            sys.modules[lib.lower()].logging.set_verbosity(level)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for noisy in ("accelerate", "peft", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    without_bitsandbytes()  # train's quantised options bring it back (train.run)


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
