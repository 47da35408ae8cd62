"""Strength calibration (`merge --calibrate A B` or `--target-change X`): rescale a slider so that ±1 means
a stated change, instead of users hunting for scales of 5–8.

The change at scale s is the mean absolute pixel change (`metrics.mean_abs_change`) of the renders at +s and
−s against scale 0, over fixed seeds, the model's native size and `--calibration-prompt`. The target is X, or
half the change between the pair's images: 0 sits between A and B, so each end moves half the way. Change is
not linear in scale, so the factor c is found by secant steps on log(change) vs log(scale); the slider is
then written with both factors times √c (ΔW times c; alpha, and so every loader's reading, unchanged).
A scale whose renders come out NaN is too strong: it counts as an infinite change, so the search steps back
below it, and it can never be the answer.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from loratool.errors import InputError, NonFiniteRender
from loratool.lora.network import COMPONENT_MODELS, LoraModule, LoraNetwork

log = logging.getLogger(__name__)

SEEDS = (0, 1)
STEPS = 20
ADAPTER = "calibrated"
TOLERANCE = 0.05  # stop once the change at ±1 is within 5 % of the target
MAX_RENDERS = 6  # scales tried at most (each: 2 signs × len(SEEDS) renders)
LIMIT = 64.0  # factors outside [1/64, 64] mean the slider does (almost) nothing or everything


@dataclass
class Sweep:
    """Renders of one slider at ±scale on fixed seeds; `change(s)` is what calibration solves for."""

    pipe: object
    prompt: str
    size: int
    tried: list[tuple[float, float | None]] = field(default_factory=list)  # (scale, change); None: NaN renders
    _zero: list = field(default_factory=list)

    def render(self, scale: float) -> list:
        from loratool.lora.apply import set_scale
        from loratool.sample.pipeline import Prompt, Schedule, embeddings, render

        for attr in COMPONENT_MODELS.values():
            set_scale(getattr(self.pipe, attr), ADAPTER, scale)
        prompt = Prompt(self.prompt, guidance=5.0 if self.prompt else 1.0)
        embeds = embeddings(self.pipe, prompt)  # again per scale: a slider may carry text-encoder LoRAs
        plan = Schedule(steps=STEPS, high_noise_frac=1.0, width=self.size, height=self.size)
        return [render(self.pipe, None, prompt, plan, seed, embeds, None) for seed in SEEDS]

    def change(self, scale: float) -> float:
        from loratool.metrics import mean_abs_change

        if not self._zero:
            self._zero[:] = self.render(0.0)  # a model that renders NaN unaided is an error, not a scale
        try:
            renders = self.render(scale) + self.render(-scale)
        except NonFiniteRender:
            self.tried.append((scale, None))
            log.info("calibration: scale %.3g renders NaN: too strong", scale)
            return math.inf
        zero = self._zero * 2
        value = sum(mean_abs_change(r, z) for r, z in zip(renders, zero, strict=True)) / len(renders)
        self.tried.append((scale, value))
        log.info("calibration: scale %.3g changes %.4f of the pixel range (target below)", scale, value)
        return value


def pair_change(images: list[Path], size: int) -> float:
    """Mean absolute change between the pair's images, at the render size."""
    from loratool.data.images import load_image
    from loratool.metrics import mean_abs_change

    a, b = (load_image(Path(p)).resize((size, size)) for p in images)
    return mean_abs_change(a, b)


def solve(change, target: float) -> tuple[float, float]:
    """The scale whose change is nearest `target`: a linear first guess, then secant steps in log-log. A scale
    whose renders are NaN (change inf) is never the answer, and later tries stay below it."""
    points = [(1.0, change(1.0))]
    if math.isinf(points[0][1]):
        raise InputError(
            "--calibrate: the slider already turns renders to NaN at ±1; merge it with a smaller weight first."
        )
    if points[0][1] <= 0:
        raise InputError("--calibrate: the slider changes nothing at ±1 on these seeds; nothing to rescale.")
    scale = _clamp(target / points[0][1])
    while len(points) < MAX_RENDERS and abs(points[-1][1] / target - 1) > TOLERANCE:
        points.append((scale, change(scale)))
        scale = _next_scale(points, target)
    return min((p for p in points if math.isfinite(p[1])), key=lambda p: abs(p[1] / target - 1))


def _next_scale(points: list[tuple[float, float]], target: float) -> float:
    """The secant step through the last two finite points (points[0] is finite), kept below the smallest scale
    that rendered NaN: past it, halfway (in log) from the largest finite scale under it."""
    finite = [p for p in points if math.isfinite(p[1])]
    scale = math.inf
    if math.isfinite(points[-1][1]):
        (s0, m0), (s1, m1) = finite[-2], finite[-1]
        slope = math.log(m1 / m0) / math.log(s1 / s0) if m0 > 0 and m1 > 0 and s1 != s0 else 0.0
        step = math.log(target / m1) / slope if slope > 0.05 else math.log(target / m1)  # flat or odd: linear
        scale = _clamp(s1 * math.exp(step))
    broken = [s for s, m in points if not math.isfinite(m)]
    if broken and scale >= min(broken):
        below = [s for s, _ in finite if s < min(broken)]
        scale = math.sqrt((max(below) if below else min(broken) / 4) * min(broken))
    return scale


def _clamp(scale: float) -> float:
    return min(max(scale, 1 / LIMIT), LIMIT)


def rescaled(network: LoraNetwork, factor: float) -> LoraNetwork:
    """Every module's ΔW times `factor` (> 0): both factors times √factor, in float32, back in their dtype."""
    root = math.sqrt(factor)
    out = LoraNetwork(metadata=dict(network.metadata), source_format=network.source_format)
    for m in network:
        down = (m.down.float() * root).to(m.down.dtype)
        up = (m.up.float() * root).to(m.up.dtype)
        out.add(LoraModule(m.component, m.path, down, up, m.alpha))
    return out


def pipeline_with(model: str | None, network: LoraNetwork):
    """The base pipeline (SDXL 1.0 base if None) with `network` injected as peft adapter ADAPTER."""
    from loratool.lora.apply import add_adapter
    from loratool.sdxl.models import DEFAULT_BASE, load_pipeline, pick_runtime

    pipe = load_pipeline(model or DEFAULT_BASE, pick_runtime(None))
    pipe.set_progress_bar_config(disable=True)
    for component, attr in COMPONENT_MODELS.items():
        add_adapter(getattr(pipe, attr), network, component, ADAPTER)
    return pipe


def calibrate(network: LoraNetwork, model: str | None, images: list[Path], target: float | None, prompt: str):
    """→ (the rescaled network, its `loratool_calibration` metadata)."""
    pipe = pipeline_with(model, network)
    size = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)  # native, as `sample` renders
    span = pair_change(images, size) if images else None
    goal = target if target is not None else span / 2
    sweep = Sweep(pipe, prompt, size)
    factor, measured = solve(sweep.change, goal)
    log.info("calibration: ×%.4g puts the change at ±1 at %.4f (target %.4f)", factor, measured, goal)
    record = {
        "factor": factor,
        "target": goal,
        "measured": measured,
        "pair": [Path(p).name for p in images],
        "pair_change": span,
        "prompt": prompt,
        "seeds": list(SEEDS),
        "steps": STEPS,
        "size": size,
        "tried": [[s, m] for s, m in sweep.tried],
    }
    return rescaled(network, factor), {"loratool_calibration": json.dumps(record)}
