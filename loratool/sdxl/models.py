"""Loading SDXL base and refiner from a hub id, a diffusers folder or a single-file checkpoint.

Every verb loads models through here, so errors read the same everywhere and the refiner always
shares the base's `text_encoder_2` and VAE instead of loading them twice.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from loratool.errors import InputError, ModelSourceError

log = logging.getLogger(__name__)

DEFAULT_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
DEFAULT_REFINER = "stabilityai/stable-diffusion-xl-refiner-1.0"
FP16_FIX_VAE = "madebyollin/sdxl-vae-fp16-fix"
PRECISIONS = ("auto", "fp16", "bf16", "fp32")
MODEL_HELP = "Hub id, diffusers folder, single-file .safetensors SDXL checkpoint, or demo."
MODEL_CONFIG_HELP = "Local diffusers folder whose configs describe a single-file --model."
DEVICE_HELP = "cuda, cuda:1, mps or cpu (default: best available)."
DEVICE_PATTERN = re.compile(r"cpu|mps|cuda(:\d+)?")


def check_device(device: str | None) -> None:
    """A --device torch understands, checked before any model loads."""
    if device is not None and not DEVICE_PATTERN.fullmatch(device):
        raise InputError(f"--device must be cuda, cuda:N, mps or cpu, not {device!r}.")


@dataclass(frozen=True)
class Runtime:
    """Where models run and in which dtype."""

    device: str
    dtype_name: str

    @property
    def dtype(self):
        import torch

        return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[self.dtype_name]


def pick_runtime(device: str | None = None, precision: str = "auto") -> Runtime:
    """CUDA → fp16 (or bf16 on request), MPS → fp16, CPU → fp32 (half precision on CPU is slow and lossy)."""
    import torch

    if precision not in PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}.")
    check_device(device)
    if device is None:
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device} was asked for but CUDA is not available on this machine.")
    if precision == "auto":
        precision = "fp32" if device == "cpu" else "fp16"
    return Runtime(device, precision)


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.endswith((".safetensors", ".ckpt", ".pt")) or "\\" in source


def _check_folder(path: Path, expected: str, what: str) -> None:
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelSourceError(
            f"{what} folder {path} has no model_index.json: pass an SDXL diffusers folder or a .safetensors checkpoint."
        )
    found = json.loads(index.read_text()).get("_class_name", "?")
    if found != expected:
        raise ModelSourceError(f"{what} folder {path} holds a {found}, not an SDXL {what} ({expected}).")


def _check_single_file(path: Path, refiner: bool, config: str | None) -> None:
    from loratool.sdxl.checkpoint import checkpoint_kind, read_keys

    if path.suffix in (".ckpt", ".pt", ".bin"):
        raise ModelSourceError(f"{path} is a pickle checkpoint, which can run code: convert it to .safetensors.")
    kind = checkpoint_kind(read_keys(path))
    wanted = "sdxl-refiner" if refiner else "sdxl-base"
    names = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl-base": "an SDXL base"}
    names |= {"sdxl-refiner": "an SDXL refiner"}  # "unknown" reads badly in the sentence below: its own
    if kind == "unknown":
        raise ModelSourceError(f"{path} is no Stable Diffusion checkpoint loratool recognises; pass {names[wanted]}.")
    if kind != wanted:
        raise ModelSourceError(f"{path} is {names[kind]} checkpoint, not {names[wanted]} checkpoint.")
    if config is None and _offline():
        raise ModelSourceError(
            f"{path} is a single file and the hub is offline: pass --model-config with a local SDXL diffusers folder."
        )


def _offline() -> bool:
    import huggingface_hub.constants as c

    return bool(c.HF_HUB_OFFLINE)


def load_pipeline(source: str, runtime: Runtime, *, refiner: bool = False, config: str | None = None, **parts):
    """Load an SDXL base (or refiner) pipeline from `source`; `parts` replace components (shared ones)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()  # stderr keeps to our own progress and one-line errors
    transformers_logging.disable_progress_bar()
    cls = StableDiffusionXLImg2ImgPipeline if refiner else StableDiffusionXLPipeline
    what = "refiner" if refiner else "model"
    source = resolve_alias(source, refiner=refiner)
    path = Path(source).expanduser()
    kwargs = dict(dtype=runtime.dtype, **parts)
    try:
        if path.is_dir():
            _check_folder(path, cls.__name__, what)
            pipe = cls.from_pretrained(str(path), **kwargs)
        elif path.is_file():
            _check_single_file(path, refiner, config)
            pipe = cls.from_single_file(str(path), config=config, local_files_only=_offline(), **kwargs)
        elif _looks_like_path(source):
            raise ModelSourceError(f"--{what} {source}: no such file or folder.")
        else:
            pipe = cls.from_pretrained(source, **kwargs)
    except ModelSourceError:
        raise
    except (OSError, ValueError) as exc:
        raise ModelSourceError(
            f"could not load {what} {source!r} ({_first_line(exc)}): if the hub is unreachable, "
            f"pass a local diffusers folder or .safetensors file with --{what}."
        ) from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(runtime.device)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


DEMO_WEIGHTS = Path(__file__).resolve().parent.parent / "demo" / "weights"


def resolve_alias(source: str, refiner: bool = False) -> str:
    """`demo` → the small SDXL-architecture model shipped inside the package (base or refiner folder)."""
    if source != "demo":
        return source
    folder = DEMO_WEIGHTS / ("refiner" if refiner else "base")
    if not (folder / "model_index.json").is_file():
        raise ModelSourceError(f"the demo model is missing from this install ({folder}); reinstall loratool.")
    return str(folder)


def load_vae(source: str, runtime: Runtime):
    from diffusers import AutoencoderKL

    path = Path(source).expanduser()
    try:
        if path.is_file():
            return AutoencoderKL.from_single_file(str(path), dtype=runtime.dtype).to(runtime.device)
        if _looks_like_path(source) and not path.exists():
            raise ModelSourceError(f"--vae {source}: no such file or folder.")
        sub = "vae" if (path / "vae").is_dir() else None
        return AutoencoderKL.from_pretrained(source, subfolder=sub, dtype=runtime.dtype).to(runtime.device)
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"could not load --vae {source!r} ({_first_line(exc)}).") from exc


def default_vae(runtime: Runtime, vae: str | None) -> str | None:
    """SDXL's VAE overflows in fp16: on CUDA fp16 use the fp16-fix VAE unless the user chose one (`--vae base`)."""
    if vae == "base":
        return None
    if vae is None and runtime.device.startswith("cuda") and runtime.dtype_name == "fp16":
        return FP16_FIX_VAE
    return vae


def load_models(
    model: str,
    refiner: str | None,
    runtime: Runtime,
    *,
    vae: str | None = None,
    model_config: str | None = None,
    refiner_config: str | None = None,
):
    """Base and (optionally) refiner pipelines, the refiner sharing text_encoder_2 and the VAE."""
    if model == "demo" and vae is None:
        vae = "base"  # the demo has its own VAE; SDXL's fp16-fix VAE would not match it
    vae_source = default_vae(runtime, vae)
    parts = {}
    if vae_source:
        try:
            parts["vae"] = load_vae(vae_source, runtime)
        except ModelSourceError:
            if vae is not None:
                raise
            log.warning("fp16-fix VAE %s unavailable; using the model's VAE (upcast to fp32).", vae_source)
    base = load_pipeline(model, runtime, config=model_config, **parts)
    if refiner in (None, "none"):
        return base, None
    ref = load_pipeline(
        refiner,
        runtime,
        refiner=True,
        config=refiner_config,
        text_encoder_2=base.text_encoder_2,
        vae=base.vae,
    )
    return base, ref
