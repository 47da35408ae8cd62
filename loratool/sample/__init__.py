"""`loratool sample`: plain renders, or slider sweeps of one LoRA through SDXL base + refiner.

`run` reads top to bottom: plan the outputs (refusing overwrites before any work) → load models → read and
check LoRAs → encode prompts once → render every (scale, seed) switching adapter weights in place →
write PNGs, contact sheet, animations and sweep.json.

Refiner policy (ensemble of experts): the base, carrying the LoRAs, denoises the first `high_noise_frac`
of the `steps`-step schedule; the refiner, carrying NO LoRA, denoises the rest. `refiner_frac` F is the
same split seen from the refiner: it runs the last F of the schedule (≈ F·steps steps), the base the first
1−F. A refiner can wash a slider out (Forge #52); `--refiner none` or a small F keeps more of it.

The package, one job per module; each imports only modules listed above it (and none imports this one):
  pipeline  one image through base + refiner: schedulers, prompt embeddings, the hand-off
  config    SampleConfig and the parsers of its flags
  reference reference-only guidance (--reference): write/read passes installed on a UNet for one run
  scales    which scales a sweep renders, their labels and file names
  sweep     every (scale, seed) with the LoRA weights switched in place
  quality   slider metrics of a sweep: change vs scale 0, growth with |scale|, glide
  sheet     contact sheet and animation
  outputs   the files: PNG text chunks, sheet, animations, sweep.json
torch, diffusers and the LoRA code load inside `run`, so importing the package (and checking flags) is instant.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from pathlib import Path

from loratool.errors import InputError
from loratool.files import check_writable, output_lock
from loratool.sample.config import SampleConfig
from loratool.sample.outputs import plan, save_png, write_sweep
from loratool.sample.pipeline import embeddings, render, set_scheduler
from loratool.sample.sweep import base_step_count, make_prompt, make_schedule, render_sweep
from loratool.sdxl.models import load_models, pick_runtime

__all__ = ["SampleConfig", "run"]

log = logging.getLogger(__name__)


def run(config: SampleConfig) -> list[Path]:
    """Render and write everything in `plan(config)`; returns the files written."""
    outputs = plan(config)
    for path in outputs.all():
        check_writable(path, config.force, file=True)
    with output_lock(config.output):  # a second run into the same folder refuses instead of racing this one
        return _render(config, outputs)


def _render(config: SampleConfig, outputs) -> list[Path]:
    from loratool.sample.reference import guides, read_reference  # imports torch

    reference = read_reference(config)  # a bad image fails before any model loads
    runtime = pick_runtime(config.device, config.precision)
    if (config.cpu_offload or config.compile) and not runtime.device.startswith("cuda"):
        flag = "--cpu-offload" if config.cpu_offload else "--compile"
        raise InputError(f"{flag} needs a CUDA device; this run is on {runtime.device}: leave {flag} out.")
    base, refiner = _load(config, runtime)
    prompt = make_prompt(config)
    refiner_embeds = embeddings(refiner, prompt) if refiner is not None else None  # before any LoRA is injected
    size = make_schedule(base, config)
    with ExitStack() as stack:  # reference guidance is on for the renders only, then the UNets are plain again
        active = [
            stack.enter_context(g) for g in guides(base, refiner, reference, (size.width, size.height), prompt.cfg)
        ]
        if not config.loras:
            return _render_plain(base, refiner, config, prompt, refiner_embeds, outputs, active, reference)
        from loratool.sdxl.adapters import Adapters, read_loras  # imports torch

        swept = config.swept_index()
        loras = read_loras(base, config.loras, swept)  # a misfit fails before rendering
        adapters = Adapters(base, loras, mode=config.switch)
        _compile(base, config)
        images = render_sweep(base, refiner, config, adapters, prompt, refiner_embeds, swept, guides=active)
    records = [x.record(i == swept) for i, x in enumerate(loras)]
    n_base = base_step_count(base, config, refiner is not None)
    ref = reference.record() if reference else None
    return write_sweep(config, outputs, images, records, n_base, reference=ref)


def _render_plain(base, refiner, config, prompt, refiner_embeds, outputs, guides, reference) -> list[Path]:
    """One image per seed, no LoRA; each written as soon as it is rendered."""
    embeds = embeddings(base, prompt)
    _compile(base, config)
    schedule = make_schedule(base, config)
    schedule.guides = guides
    for seed in config.seeds:
        path = outputs.images[(seed, 0.0)]
        image = render(base, refiner, prompt, schedule, seed, embeds, refiner_embeds)
        save_png(image, path, config, seed, reference=reference.record() if reference else None)
        log.info("wrote %s", path)
    return list(outputs.images.values())


def _load(config: SampleConfig, runtime):
    base, refiner = load_models(
        config.model,
        config.refiner if config.uses_refiner else None,
        runtime,
        vae=config.vae,
        model_config=config.model_config,
        refiner_config=config.refiner_config,
    )
    for pipe in (base, refiner):
        set_scheduler(pipe, config.scheduler)
        if pipe is not None and config.cpu_offload:
            pipe.enable_model_cpu_offload(device=runtime.device)
    return base, refiner


def _compile(base, config: SampleConfig) -> None:
    if config.compile:  # in place: the UNet stays a ModelMixin, so set_adapters still finds it
        base.unet.compile()
