"""The sweep itself: every (scale, seed) through base + refiner with adapter weights switched in place,
then the files that describe it (PNGs, contact sheet, animations, sweep.json with its metrics)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from loratool import __version__
from loratool.sweep import scale_labels, seed_metrics

log = logging.getLogger(__name__)


def lora_weights(adapters, swept: int, scale: float) -> list[float]:
    """The swept LoRA at its weight × scale, the others at their fixed weights."""
    return [x.weight * scale if i == swept else x.weight for i, x in enumerate(adapters.loras)]


def base_step_count(base, config, has_refiner: bool) -> int:
    """Steps the base runs (the LoRAs see only these): all of them, or those before the refiner hand-off."""
    from loratool.sdxl.render import base_steps

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


def render_sweep(base, refiner, config, adapters, prompt, refiner_embeds, swept: int, output_type="pil") -> dict:
    """{(seed, scale): PIL image} for every swept scale, plus scale 0 (the metrics' reference)."""
    from loratool.sample import schedule
    from loratool.sdxl.render import embeddings, render, step_embeds

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
        plan = schedule(base, config)
        plan.output_type = output_type
        if gated and start < n_base:
            text = step_embeds(embeds_for(on), prompt.cfg) if adapters.touches_text else None
            plan.callback = _switch_at(adapters, on, start, text)
            plan.callback_inputs = list(text or {})
        first = off if gated else on
        embeds = embeds_for(first)
        for seed in config.seeds:
            adapters.set(first)
            images[(seed, scale)] = render(base, refiner, prompt, plan, seed, embeds, refiner_embeds)
            log.info("rendered seed %d scale %g", seed, scale)
    adapters.set(off)
    return images


def refiner_policy(config, n_base: int) -> dict:
    if not config.uses_refiner:
        return {"refiner": None, "policy": "base only: the base, with the LoRAs, runs every step", "base_steps": n_base}
    return {
        "refiner": config.refiner,
        "policy": "ensemble of experts: the base with the LoRAs denoises the first high_noise_frac of the "
        "schedule, the refiner WITHOUT LoRAs the rest (refiner_frac = 1 - high_noise_frac)",
        "high_noise_frac": config.high_noise_frac,
        "refiner_frac": round(1.0 - config.high_noise_frac, 10),
        "base_steps": n_base,
        "refiner_steps": config.steps - n_base,
        "refiner_loras": [],
    }


def write_sweep(config, outputs, images: dict, loras: list[dict], base) -> list[Path]:
    """PNGs with parameters, the contact sheet, one animation per seed, and sweep.json."""
    from loratool.sample import save_png
    from loratool.sheet import contact_sheet, save_animation, save_sheet

    for (seed, scale), path in outputs.images.items():
        save_png(images[(seed, scale)], path, config, seed, loras, scale)
    for seed, path in outputs.references.items():
        save_png(images[(seed, 0.0)], path, config, seed, loras, 0.0)
    labels = scale_labels(config.scales)
    grid = [[images[(seed, s)] for s in config.scales] for seed in config.seeds]
    swept = next(x for x in loras if x["swept"])
    # ASCII only: Pillow's bundled font has no glyphs for × or —.
    title = (f"{swept['name']}: scale" + (f' | "{config.prompt}"' if config.prompt else ""))[:80]
    sheet = contact_sheet(grid, [f"{x}" for x in labels], [f"seed {s}" for s in config.seeds], title)
    save_sheet(sheet, outputs.sheet, config.force)
    for seed, path in outputs.animations.items():
        save_animation([images[(seed, s)] for s in sorted(config.scales)], path, config.force)
    metrics = _metrics(config, images)
    _log_table(config, metrics)
    manifest = _manifest(config, outputs, loras, metrics, base_step_count(base, config, config.uses_refiner))
    from loratool.files import atomic_path

    with atomic_path(outputs.manifest, force=config.force) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    written = outputs.all()
    log.info("wrote %d files to %s", len(written), config.output)
    return written


def _metrics(config, images: dict) -> dict:
    from loratool.sweep import mean_abs_change

    result = {}
    for seed in config.seeds:
        changes = [mean_abs_change(images[(seed, s)], images[(seed, 0.0)]) for s in config.scales]
        result[str(seed)] = seed_metrics(config.scales, changes)
    return result


def _log_table(config, metrics: dict) -> None:
    """Mean |Δpixel| vs scale 0 (×1000) per scale, and Spearman(|scale|, Δ), one row per seed, on stderr."""
    labels = scale_labels(config.scales)
    log.info("mean |Δ| vs scale 0 (×1000)")
    log.info("%8s " + " ".join(f"{x:>8}" for x in labels) + " %9s", "seed", "spearman")
    for seed, m in metrics.items():
        row = " ".join(f"{1000 * v:8.2f}" for v in m["mean_abs_change"].values())
        rho = m["spearman_abs_scale_vs_change"]
        log.info("%8s %s %9s", seed, row, "n/a" if rho is None else f"{rho:.3f}")


def _manifest(config, outputs, loras: list[dict], metrics: dict, n_base: int) -> dict:
    def rel(path: Path) -> str:
        return path.name

    return {
        "loratool_version": __version__,
        "config": config.record(),
        "loras": loras,
        "refiner": refiner_policy(config, n_base),
        "lora_start": {"fraction": config.lora_start, "base_steps_off": round(config.lora_start * n_base)},
        "files": {
            "images": [{"seed": s, "scale": x, "file": rel(p)} for (s, x), p in outputs.images.items()],
            "references": {str(s): rel(p) for s, p in outputs.references.items()},
            "sheet": rel(outputs.sheet),
            "animations": {str(s): rel(p) for s, p in outputs.animations.items()},
        },
        "metrics": metrics,
    }
