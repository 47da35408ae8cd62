"""Rendering through SDXL base + refiner (the ensemble-of-experts hand-off), one PNG per seed.

Models load once; prompt embeddings are computed once and reused for every seed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loratool import __version__
from loratool.errors import InputError
from loratool.sdxl.models import DEFAULT_BASE, DEFAULT_REFINER

log = logging.getLogger(__name__)


@dataclass
class SampleConfig:
    """Everything `loratool sample` needs; also what each PNG records."""

    output: Path = Path("samples")
    prompt: str = ""
    negative_prompt: str = ""
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 30
    guidance: float = 5.0
    width: int | None = None
    height: int | None = None
    high_noise_frac: float = 0.8
    model: str = DEFAULT_BASE
    model_config: str | None = None
    refiner: str | None = DEFAULT_REFINER
    refiner_config: str | None = None
    vae: str | None = None
    precision: str = "auto"
    device: str | None = None
    force: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise InputError(f"--steps must be at least 1, not {self.steps}.")
        if not 0.0 < self.high_noise_frac <= 1.0:
            raise InputError(f"--high-noise-frac must be in (0, 1], not {self.high_noise_frac}.")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (value < 64 or value % 8):
                raise InputError(f"--{name} must be a multiple of 8 and at least 64, not {value}.")


def parse_seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise InputError(f"--seeds takes comma-separated integers, not {text!r}.") from None


def _embeddings(base, config: SampleConfig):
    """Prompt embeddings once per run: they do not depend on the seed (or, later, the LoRA scale)."""
    pe, npe, pooled, npooled = base.encode_prompt(
        prompt=config.prompt,
        negative_prompt=config.negative_prompt,
        device=base.device,
        do_classifier_free_guidance=config.guidance > 1.0,
    )
    return dict(
        prompt_embeds=pe,
        negative_prompt_embeds=npe,
        pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=npooled,
    )


def render(base, refiner, config: SampleConfig, seed: int, embeds: dict):
    """One image (PIL) for one seed: base to high_noise_frac, then the refiner finishes (if any)."""
    import torch

    size = base.default_sample_size * base.vae_scale_factor
    generator = torch.Generator("cpu").manual_seed(seed)
    common = dict(num_inference_steps=config.steps, guidance_scale=config.guidance)
    hand_off = refiner is not None and config.high_noise_frac < 1.0
    out = base(
        **embeds,
        **common,
        width=config.width or size,
        height=config.height or size,
        generator=generator,
        denoising_end=config.high_noise_frac if hand_off else None,
        output_type="latent" if hand_off else "pil",
    ).images
    if not hand_off:
        return out[0]
    return refiner(
        prompt=config.prompt,
        negative_prompt=config.negative_prompt,
        image=out,
        **common,
        denoising_start=config.high_noise_frac,
        generator=generator,
    ).images[0]


def parameters_text(config: SampleConfig, seed: int, size: tuple[int, int]) -> str:
    """A1111-style `parameters` chunk, so other UIs and image viewers show how an image was made."""
    lines = [config.prompt, f"Negative prompt: {config.negative_prompt}"]
    lines.append(
        f"Steps: {config.steps}, CFG scale: {config.guidance}, Seed: {seed}, Size: {size[0]}x{size[1]}, "
        f"Model: {config.model}, Refiner: {config.refiner or 'none'}, High noise frac: {config.high_noise_frac}, "
        f"Version: loratool {__version__}"
    )
    return "\n".join(lines)


def save_png(image, path: Path, config: SampleConfig, seed: int) -> None:
    from PIL.PngImagePlugin import PngInfo

    from loratool.files import atomic_path

    info = PngInfo()
    info.add_text("parameters", parameters_text(config, seed, image.size))
    record = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()} | {"seed": seed}
    info.add_text("loratool", json.dumps(record))
    with atomic_path(path, force=config.force) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def run(config: SampleConfig) -> list[Path]:
    from loratool.files import check_writable
    from loratool.sdxl.models import load_models, pick_runtime

    paths = [Path(config.output) / f"seed{seed}.png" for seed in config.seeds]
    for path in paths:
        check_writable(path, config.force)
    runtime = pick_runtime(config.device, config.precision)
    base, refiner = load_models(
        config.model,
        config.refiner,
        runtime,
        vae=config.vae,
        model_config=config.model_config,
        refiner_config=config.refiner_config,
    )
    embeds = _embeddings(base, config)
    for seed, path in zip(config.seeds, paths, strict=True):
        save_png(render(base, refiner, config, seed, embeds), path, config, seed)
        log.info("wrote %s", path)
    return paths
