"""`loratool sample`: plain renders, or slider sweeps of one LoRA through SDXL base + refiner.

Reads top to bottom: plan the outputs (refusing overwrites before any work) → load models → read and
check LoRAs → encode prompts once → render every (scale, seed) switching adapter weights in place →
write PNGs, contact sheet, animations and sweep.json.

Refiner policy (ensemble of experts): the base, carrying the LoRAs, denoises the first `high_noise_frac`
of the `steps`-step schedule; the refiner, carrying NO LoRA, denoises the rest. `refiner_frac` F is the
same split seen from the refiner: it runs the last F of the schedule (≈ F·steps steps), the base the first
1−F. A refiner can wash a slider out (Forge #52); `--refiner none` or a small F keeps more of it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loratool import __version__
from loratool.errors import InputError
from loratool.sdxl.index import parse_spec
from loratool.sdxl.models import DEFAULT_BASE, DEFAULT_REFINER
from loratool.sdxl.render import check_scheduler
from loratool.sweep import image_name, scale_labels

log = logging.getLogger(__name__)


@dataclass
class SampleConfig:
    """Everything `loratool sample` needs; also what each PNG and sweep.json record."""

    output: Path = Path("samples")
    prompt: str = ""
    prompt_2: str | None = None
    negative_prompt: str = ""
    negative_prompt_2: str | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 30
    guidance: float = 5.0
    width: int | None = None
    height: int | None = None
    original_size: tuple[int, int] | None = None  # (width, height)
    crop: tuple[int, int] = (0, 0)  # (x, y) = (left, top)
    target_size: tuple[int, int] | None = None  # (width, height)
    scheduler: str | None = None
    high_noise_frac: float | None = None  # default 0.8
    refiner_frac: float | None = None  # the refiner's share: 1 - high_noise_frac
    loras: list[str] = field(default_factory=list)  # FILE[:WEIGHT]
    sweep: str | None = None  # which LoRA is swept (needed with several)
    scales: list[float] = field(default_factory=lambda: [-1.0, -0.5, 0.0, 0.5, 1.0])
    lora_start: float = 0.0  # swept LoRA off for this fraction of the base steps
    model: str = DEFAULT_BASE
    model_config: str | None = None
    refiner: str | None = DEFAULT_REFINER
    refiner_config: str | None = None
    vae: str | None = None
    precision: str = "auto"
    device: str | None = None
    cpu_offload: bool = False
    compile: bool = False
    switch: str = "fold"  # fold | fuse | adapters: how LoRA weights change (see benchmarks/sample.py)
    force: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise InputError(f"--steps must be at least 1, not {self.steps}.")
        self._resolve_split()
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (value < 64 or value % 8):
                raise InputError(f"--{name} must be a multiple of 8 and at least 64, not {value}.")
        if not 0.0 <= self.lora_start <= 1.0:
            raise InputError(f"--lora-start must be in [0, 1], not {self.lora_start}.")
        if not self.seeds:
            raise InputError("--seeds needs at least one seed.")
        if len(set(self.seeds)) != len(self.seeds):
            raise InputError(f"--seeds lists a seed twice: {self.seeds}.")
        if self.loras and not self.scales:
            raise InputError("--values/--slider gave no scales.")
        check_scheduler(self.scheduler)
        self.swept_index()  # a bad --sweep fails now, not after loading models

    def _resolve_split(self) -> None:
        if self.refiner_frac is not None:
            if self.high_noise_frac is not None:
                raise InputError("give --high-noise-frac or --refiner-frac, not both (F = 1 - high-noise-frac).")
            if not 0.0 <= self.refiner_frac < 1.0:
                raise InputError(f"--refiner-frac must be in [0, 1), not {self.refiner_frac}.")
            self.high_noise_frac = round(1.0 - self.refiner_frac, 10)
        if self.high_noise_frac is None:
            self.high_noise_frac = 0.8
        if not 0.0 < self.high_noise_frac <= 1.0:
            raise InputError(f"--high-noise-frac must be in (0, 1], not {self.high_noise_frac}.")

    @property
    def uses_refiner(self) -> bool:
        return self.refiner not in (None, "none") and self.high_noise_frac < 1.0

    def swept_index(self) -> int | None:
        """Position of the swept LoRA in `loras`: the only one, or the one --sweep names (path or file stem)."""
        if not self.loras:
            if self.sweep:
                raise InputError("--sweep names a LoRA to sweep, but no --lora was given.")
            return None
        paths = [parse_spec(s).path for s in self.loras]
        if self.sweep is None:
            if len(paths) > 1:
                raise InputError("several --lora files: pick the swept one with --sweep FILE.")
            return 0
        hits = [i for i, p in enumerate(paths) if self.sweep in (str(p), p.name, p.stem)]
        if len(hits) != 1:
            raise InputError(f"--sweep {self.sweep} must name exactly one of the --lora files.")
        return hits[0]

    def record(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def parse_seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise InputError(f"--seeds takes comma-separated integers, not {text!r}.") from None


def parse_pair(text: str | None, flag: str, sep: str) -> tuple[int, int] | None:
    """`1024x768` (sep "x") or `0,32` (sep ",") → (1024, 768); errors name the flag."""
    if text is None:
        return None
    try:
        a, b = (int(v) for v in text.lower().split(sep))
    except ValueError:
        raise InputError(f"{flag} takes two integers as A{sep}B, not {text!r}.") from None
    if a < 0 or b < 0:
        raise InputError(f"{flag} takes non-negative integers, not {text!r}.")
    return a, b


@dataclass
class Plan:
    """Every file a run writes, known before any model is loaded."""

    images: dict[tuple[int, float], Path]  # (seed, scale) → png; without LoRAs the scale is 0.0
    references: dict[int, Path] = field(default_factory=dict)  # scale-0 images when 0 is not a swept scale
    sheet: Path | None = None
    animations: dict[int, Path] = field(default_factory=dict)
    manifest: Path | None = None

    def all(self) -> list[Path]:
        extra = [p for p in (self.sheet, self.manifest) if p]
        return [*self.images.values(), *self.references.values(), *extra, *self.animations.values()]


def plan(config: SampleConfig) -> Plan:
    out = Path(config.output)
    if not config.loras:
        return Plan({(seed, 0.0): out / f"seed{seed}.png" for seed in config.seeds})
    labels = dict(zip(config.scales, scale_labels(config.scales), strict=True))
    images = {(seed, s): out / image_name(seed, labels[s]) for seed in config.seeds for s in config.scales}
    refs = {} if 0.0 in config.scales else {seed: out / image_name(seed, "0.00") for seed in config.seeds}
    gifs = {seed: out / f"sweep-seed{seed}.gif" for seed in config.seeds}
    return Plan(images, refs, out / "sheet.png", gifs, out / "sweep.json")


def parameters_text(config: SampleConfig, seed: int, size: tuple[int, int], loras: list[dict], scale=None) -> str:
    """A1111-style `parameters` chunk, so other UIs and image viewers show how an image was made."""
    lines = [config.prompt, f"Negative prompt: {config.negative_prompt}"]
    fields = [
        f"Steps: {config.steps}, CFG scale: {config.guidance}, Seed: {seed}, Size: {size[0]}x{size[1]}",
        f"Model: {config.model}, Refiner: {config.refiner if config.uses_refiner else 'none'}",
        f"High noise frac: {config.high_noise_frac}",
    ]
    if config.scheduler:
        fields.append(f"Sampler: {config.scheduler}")
    if loras:
        names = ", ".join(f"{x['name']}: {x['sha256'][:12]}" for x in loras)
        weights = ", ".join(f"<lora:{x['name']}:{x['weight']}>" for x in loras)
        fields.append(f'Lora hashes: "{names}", Lora weights: "{weights}"')
        swept = next(x for x in loras if x["swept"])
        fields.append(f"Slider: {swept['name']}, Slider scale: {scale}, LoRA start: {config.lora_start}")
    fields.append(f"Version: loratool {__version__}")
    return "\n".join([*lines, ", ".join(fields)])


def save_png(image, path: Path, config: SampleConfig, seed: int, loras: list[dict] | None = None, scale=None) -> None:
    from PIL.PngImagePlugin import PngInfo

    from loratool.files import atomic_path

    loras = loras or []
    info = PngInfo()
    info.add_text("parameters", parameters_text(config, seed, image.size, loras, scale))
    record = config.record() | {"seed": seed, "size": list(image.size)}
    if loras:
        record |= {"scale": scale, "lora_weights": loras}
    info.add_text("loratool", json.dumps(record))
    with atomic_path(path, force=config.force) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def run(config: SampleConfig) -> list[Path]:
    """Render and write everything in `plan(config)`; returns the files written."""
    from loratool.files import check_writable
    from loratool.sdxl.models import pick_runtime
    from loratool.sdxl.render import embeddings, render

    outputs = plan(config)
    for path in outputs.all():
        check_writable(path, config.force)
    runtime = pick_runtime(config.device, config.precision)
    if (config.cpu_offload or config.compile) and not runtime.device.startswith("cuda"):
        flag = "--cpu-offload" if config.cpu_offload else "--compile"
        raise InputError(f"{flag} needs a CUDA device; this run is on {runtime.device}: leave {flag} out.")
    base, refiner = _load(config, runtime)
    prompt = _prompt(config)
    refiner_embeds = embeddings(refiner, prompt) if refiner is not None else None  # before any LoRA is injected
    if not config.loras:
        embeds = embeddings(base, prompt)
        _compile(base, config)
        for seed in config.seeds:
            path = outputs.images[(seed, 0.0)]
            image = render(base, refiner, prompt, schedule(base, config), seed, embeds, refiner_embeds)
            save_png(image, path, config, seed)
            log.info("wrote %s", path)
        return list(outputs.images.values())
    from loratool.sdxl.adapters import Adapters, read_loras
    from loratool.slider import render_sweep, write_sweep

    swept = config.swept_index()
    loras = read_loras(base, config.loras, swept)  # a misfit fails before rendering
    adapters = Adapters(base, loras, mode=config.switch)
    _compile(base, config)
    images = render_sweep(base, refiner, config, adapters, prompt, refiner_embeds, swept)
    return write_sweep(config, outputs, images, [x.record(i == swept) for i, x in enumerate(loras)], base)


def _load(config: SampleConfig, runtime):
    from loratool.sdxl.models import load_models
    from loratool.sdxl.render import set_scheduler

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


def _prompt(config: SampleConfig):
    from loratool.sdxl.render import Prompt

    def hw(size):
        return None if size is None else (size[1], size[0])  # flags say WxH; diffusers wants (height, width)

    return Prompt(
        prompt=config.prompt,
        prompt_2=config.prompt_2,
        negative=config.negative_prompt,
        negative_2=config.negative_prompt_2,
        guidance=config.guidance,
        original_size=hw(config.original_size),
        crops_coords_top_left=(config.crop[1], config.crop[0]),
        target_size=hw(config.target_size),
    )


def schedule(base, config: SampleConfig):
    from loratool.sdxl.render import Schedule

    size = base.default_sample_size * base.vae_scale_factor
    return Schedule(config.steps, config.high_noise_frac, config.width or size, config.height or size)
