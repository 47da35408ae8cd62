"""One SDXL image through base + refiner, from prompt embeddings computed once (ensemble-of-experts hand-off).

The base denoises the first `high_noise_frac` of the schedule and hands latents to the refiner, which
finishes the rest. The refiner never carries a LoRA: its embeddings are encoded before any is injected.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loratool.errors import InputError, NonFiniteRender

SCHEDULERS = {
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm++2m": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
}


def check_scheduler(name: str | None) -> None:
    if name is not None and name not in SCHEDULERS:
        raise InputError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, not {name!r}.")


def set_scheduler(pipe, name: str | None) -> None:
    """Same schedule settings (betas, spacing), another solver: `from_config` of the pipeline's scheduler."""
    if name is None or pipe is None:
        return
    import diffusers

    check_scheduler(name)
    pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)


@dataclass
class Prompt:
    """The text and the micro-conditioning, as the pipelines want them (sizes as (height, width))."""

    prompt: str = ""
    prompt_2: str | None = None
    negative: str = ""
    negative_2: str | None = None
    guidance: float = 5.0
    guidance_rescale: float = 0.0
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None

    @property
    def cfg(self) -> bool:
        return self.guidance > 1.0

    def conditioning(self) -> dict:
        return dict(
            original_size=self.original_size,
            crops_coords_top_left=self.crops_coords_top_left,
            target_size=self.target_size,
        )


def embeddings(pipe, prompt: Prompt) -> dict:
    """encode_prompt once, weights `(word:1.3)` honoured; the result replaces the strings in every later call."""
    from loratool.sdxl.prompts import encode

    return encode(pipe, prompt.prompt, prompt.prompt_2, prompt.negative, prompt.negative_2, cfg=prompt.cfg)


def step_embeds(embeds: dict, cfg: bool) -> dict:
    """The tensors the base pipeline holds during its loop (negative first under CFG), for a mid-run swap."""
    import torch

    if not cfg:
        return {"prompt_embeds": embeds["prompt_embeds"], "add_text_embeds": embeds["pooled_prompt_embeds"]}
    return {
        "prompt_embeds": torch.cat([embeds["negative_prompt_embeds"], embeds["prompt_embeds"]]),
        "add_text_embeds": torch.cat([embeds["negative_pooled_prompt_embeds"], embeds["pooled_prompt_embeds"]]),
    }


@dataclass
class Schedule:
    steps: int = 30
    high_noise_frac: float = 0.8
    width: int = 1024
    height: int = 1024
    callback: object = None  # callback_on_step_end for the base (LoRA switches)
    callback_inputs: list[str] = field(default_factory=list)
    output_type: str = "pil"  # "np" gives float images (tests compare renders before 8-bit rounding)
    guides: list = field(default_factory=list)  # reference guides (sample/reference.py), restarted for each seed


def render(base, refiner, prompt: Prompt, schedule: Schedule, seed: int, embeds: dict, refiner_embeds: dict | None):
    """One PIL image for one seed: base to high_noise_frac, then the refiner (if any) finishes. A render with
    NaN or infinite pixels raises NonFiniteRender (see `pixels`)."""
    import torch

    generator = torch.Generator("cpu").manual_seed(seed)
    for guide in schedule.guides:
        guide.start(seed)
    common = dict(
        num_inference_steps=schedule.steps,
        guidance_scale=prompt.guidance,
        guidance_rescale=prompt.guidance_rescale,
        **prompt.conditioning(),
    )
    hand_off = refiner is not None and schedule.high_noise_frac < 1.0
    wanted = "np" if schedule.output_type == "pil" else schedule.output_type  # checked, then made PIL here
    extra = {}
    if schedule.callback is not None:
        extra = dict(
            callback_on_step_end=schedule.callback, callback_on_step_end_tensor_inputs=schedule.callback_inputs
        )
    with torch.no_grad():
        out = base(
            **embeds,
            **common,
            **extra,
            width=schedule.width,
            height=schedule.height,
            generator=generator,
            denoising_end=schedule.high_noise_frac if hand_off else None,
            output_type="latent" if hand_off else wanted,
        ).images
        if hand_off:
            out = refiner(
                **refiner_embeds,
                **common,
                image=out,
                denoising_start=schedule.high_noise_frac,
                generator=generator,
                output_type=wanted,
            ).images
    return pixels(base, out, seed) if schedule.output_type == "pil" else out[0]


def pixels(pipe, images, seed: int):
    """The first of a pipeline's float images as PIL, as diffusers converts them, once it is known to be
    finite: diffusers would cast NaN to 0 (a black image) and numpy would warn on stderr."""
    import numpy as np

    if not np.isfinite(images[0]).all():
        raise NonFiniteRender(
            f"seed {seed} rendered NaN or infinite pixels: a LoRA this strong breaks this model (sweep smaller "
            "scales), or in fp16 the VAE overflowed (--precision fp32, or a VAE fixed for fp16 via --vae)."
        )
    return pipe.image_processor.numpy_to_pil(images[:1])[0]


def base_steps(steps: int, high_noise_frac: float, timesteps: list[int], train_steps: int = 1000) -> int:
    """How many of the schedule's steps the base runs before the hand-off (diffusers' own cut-off rule)."""
    if high_noise_frac >= 1.0:
        return steps
    cutoff = int(round(train_steps - high_noise_frac * train_steps))
    return sum(1 for t in timesteps if t >= cutoff)
