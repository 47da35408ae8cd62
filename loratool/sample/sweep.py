"""The sweep itself: every (scale, seed) through base + refiner, adapter weights switched in place, and when
in the schedule the swept LoRA comes on (--lora-start)."""

from __future__ import annotations

import logging

from loratool.errors import NonFiniteRender
from loratool.sample.config import SampleConfig
from loratool.sample.pipeline import Prompt, Schedule, base_steps, embeddings, render, step_embeds

log = logging.getLogger(__name__)


def lora_weights(adapters, swept: int, scale: float) -> list[float]:
    """The swept LoRA at its weight × scale, the others at their fixed weights."""
    return [x.weight * scale if i == swept else x.weight for i, x in enumerate(adapters.loras)]


def base_step_count(base, config, has_refiner: bool) -> int:
    """Steps the base runs (the LoRAs see only these): all of them, or those before the refiner hand-off."""
    if not has_refiner:
        return config.steps
    base.scheduler.set_timesteps(config.steps, device="cpu")
    timesteps = [int(t) for t in base.scheduler.timesteps]
    return base_steps(config.steps, config.high_noise_frac, timesteps, base.scheduler.config.num_train_timesteps)


def _switch_at(adapters, weights: list[float], step: int, text: dict | None):
    """callback_on_step_end: after base step `step` - 1 the swept LoRA comes on (and, if it has text-encoder
    parts, the prompt embeddings encoded with it replace those encoded without it)."""

    def callback(pipe, index, timestep, tensors):
        if index + 1 != step:
            return {}
        adapters.set(weights)
        return dict(text) if text else {}

    return callback


def render_sweep(
    base, refiner, config, adapters, prompt, refiner_embeds, swept: int, output_type="pil", guides=()
) -> dict:
    """{(seed, scale): PIL image} for every swept scale, plus scale 0 (the metrics' reference); `guides` are
    the entered reference guides, if any."""
    cache: dict[tuple, dict] = {}

    def embeds_for(weights: list[float]) -> dict:
        key = tuple(weights) if adapters.touches_text else ()  # UNet-only LoRAs: encode once per sweep
        if key not in cache:
            adapters.set(weights)
            cache[key] = embeddings(base, prompt)
        return cache[key]

    n_base = base_step_count(base, config, refiner is not None)
    start = round(config.lora_start * n_base)  # base steps with the swept LoRA off
    scales = sorted(set(config.scales) | {0.0}, key=lambda s: (s != 0.0, s))  # scale 0 first: the plain model
    off = lora_weights(adapters, swept, 0.0)
    images = {}
    for scale in scales:
        on = lora_weights(adapters, swept, scale)
        gated = 0 < start and scale != 0.0
        plan = make_schedule(base, config)
        plan.output_type = output_type
        plan.guides = list(guides)
        if gated and start < n_base:
            text = step_embeds(embeds_for(on), prompt.cfg) if adapters.touches_text else None
            plan.callback = _switch_at(adapters, on, start, text)
            plan.callback_inputs = list(text or {})
        first = off if gated else on
        embeds = embeds_for(first)
        for seed in config.seeds:
            adapters.set(first)
            try:
                images[(seed, scale)] = render(base, refiner, prompt, plan, seed, embeds, refiner_embeds)
            except NonFiniteRender as error:
                raise NonFiniteRender(f"At scale {scale:g}, {error}") from None
            log.info("rendered seed %d scale %g", seed, scale)
    adapters.set(off)
    return images


def make_prompt(config: SampleConfig) -> Prompt:
    """The config's text and micro-conditioning as the pipelines want them."""

    def hw(size):
        return None if size is None else (size[1], size[0])  # flags say WxH; diffusers wants (height, width)

    return Prompt(
        prompt=config.prompt,
        prompt_2=config.prompt_2,
        negative=config.negative_prompt,
        negative_2=config.negative_prompt_2,
        guidance=config.guidance,
        guidance_rescale=config.guidance_rescale,
        original_size=hw(config.original_size),
        crops_coords_top_left=(config.crop[1], config.crop[0]),
        target_size=hw(config.target_size),
    )


def make_schedule(base, config: SampleConfig) -> Schedule:
    """Steps, hand-off and size (the model's native size unless --width/--height say otherwise)."""
    size = base.default_sample_size * base.vae_scale_factor
    return Schedule(config.steps, config.high_noise_frac, config.width or size, config.height or size)
