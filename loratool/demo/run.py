"""`loratool demo`: the whole copy-machine → slider workflow on the embedded demo model, offline, in minutes.

A concept pair (two scenes that differ in one attribute) → a slider (recipe 2: two copy-machine LoRAs merged
A:+1 B:−1; recipe 1: B's image trained on top of A folded in; recipe 3: one LoRA trained on the pair; recipe 4:
a text slider from the pair's two captions) → a −1..1
sweep through base + refiner → the attribute measured on every render (demo.evaluation), to show that the
slider really slides, and what else it changed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loratool.errors import InputError, OutputExistsError
from loratool.lora.targets import UNET_BLOCKS, parse_blocks
from loratool.options import option
from loratool.sample.config import parse_seeds
from loratool.train.config import parse_vary

log = logging.getLogger(__name__)
CONCEPTS = ("size", "colour", "position")
# Measured on four pair sets (datasets/README.md, recipe 2, the decoy lab): a colour slider started after a
# quarter of the base steps follows the pair as steadily or more (Spearman 0.93–1.00 against 0.70–0.97) and
# keeps the scene (0.94–1.00 against 0.34–1.00), still spanning 0.59–0.96 of the pair. A size slider started
# there keeps more too, but on the circle and triangle pairs it hardly moves (span 0.15 and 0.04 against 0.96
# and 0.55), and position is laid out in the first steps: both start at 0.
LORA_START = {"colour": 0.25}
# How recipe 2 trains a slider's halves, per concept (datasets/README.md, "Which UNet blocks..."): for size, on
# the mid and up blocks only and each on its image and seven turns of its hue, so the halves edit the size of
# what is drawn instead of redrawing their pair. On eight size pairs that kept the rest of the scene on more
# renders on all eight (0.86 against 0.56) and jumped less on six (0.48 against 0.54), going less far (span
# 0.67 against 1.02); colour and place need the down blocks. Recipe 1 (the minus copy, then the plus image on it
# folded in) trains both its LoRAs on the mid and up blocks for size, without hue turns: on the same eight pairs
# its largest jump averaged 0.39 against 0.47 on every block (less on all eight) and it kept the scene on 0.85 of
# renders against 0.68 ("Recipe 1 on the mid and up blocks"). At 150 steps per LoRA instead of 300, on eleven
# size pairs, it kept the scene on 0.95 of renders against 0.90 and moved less far (span 0.65 against 0.85),
# jumping no more (0.40 against 0.41), on half the training steps ("Recipe 1 on fewer steps").
TRAINED_ON = {
    (2, "size"): {"blocks": ["mid", "up"], "vary": ["hue"]},
    (1, "size"): {"blocks": ["mid", "up"], "steps": 150},
}
STEPS = 300


@dataclass
class DemoConfig:
    """Settings of `loratool demo`; the defaults finish in a few minutes on a laptop CPU."""

    output: Path = option(Path("demo-out"), "Output folder.", "-o", "--output")
    concept: str = option("size", "size | colour | position")
    recipe: int = option(
        2,
        "2: copy both, merge A:1 B:-1. 1: train A on B folded in. 3: one LoRA on the pair. "
        "4: a text slider from the pair's two captions (no images).",
    )
    seeds: list[int] = option([0, 1, 2, 3], "Comma-separated seeds of the sweep.", cli_type=str)
    scales: list[float] = field(default_factory=lambda: [-1.0, -0.5, 0.0, 0.5, 1.0])
    pair_seed: int = option(0, "Which pair of the concept (drawn from this seed).")
    steps: int | None = option(
        None,
        f"Training steps per LoRA (the budget; copies stop once copied); default "
        f"{TRAINED_ON[1, 'size']['steps']} for recipe 1's size LoRAs, {STEPS} otherwise.",
    )
    rank: int = 8
    sample_steps: int = 20
    prompt: str | None = option(None, "Prompt of the sweep (default: the pair's scene minus the concept).")
    lora_start: float | None = option(
        None,
        "Slider off for this fraction of the sweep's base steps (as sample --lora-start); default 0.25 for "
        "colour (keeps the rest of the scene while the hue moves), 0 for size and position (laid out in the "
        "first steps).",
    )
    blocks: list[str] | None = option(
        None,
        "UNet blocks the slider's LoRAs train on (as train --blocks); default mid,up for size with recipes 1 "
        "and 2, every block otherwise.",
        cli_type=str,
    )
    vary: list[str] | None = option(
        None,
        "What recipe 2's halves vary alike (as train --vary); default hue for size, nothing otherwise.",
        cli_type=str,
    )
    force: bool = option(False, "Overwrite existing outputs.")

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        if isinstance(self.seeds, str):
            self.seeds = parse_seeds(self.seeds)
        if self.concept not in CONCEPTS:
            raise InputError(f"--concept must be one of {', '.join(CONCEPTS)}, not {self.concept!r}.")
        if self.recipe not in (1, 2, 3, 4):
            raise InputError(
                f"--recipe must be 1 (merge-then-train), 2 (train both, subtract), 3 (one slider on the pair) or "
                f"4 (a text slider from the pair's captions), not {self.recipe}."
            )
        if self.lora_start is None:
            self.lora_start = LORA_START.get(self.concept, 0.0)
        if not 0.0 <= self.lora_start <= 1.0:
            raise InputError(f"--lora-start must be in [0, 1], not {self.lora_start}.")
        trained = TRAINED_ON.get((self.recipe, self.concept), {})
        if self.steps is None:
            self.steps = trained.get("steps", STEPS)
        if self.steps < 1:
            raise InputError(f"--steps must be at least 1, not {self.steps}.")
        self.blocks = parse_blocks(trained.get("blocks", list(UNET_BLOCKS)) if self.blocks is None else self.blocks)
        self.vary = parse_vary(trained.get("vary", []) if self.vary is None else self.vary)
        if self.vary and self.recipe != 2:
            raise InputError("--vary varies the two halves of recipe 2; drop it with --recipe 1, 3 or 4.")

    def sweep_prompt(self) -> str:
        """A slider is used inside a prompt: by default the scene of the pair minus the concept's words, e.g.
        "a blue triangle on the left" for size (measured: size Spearman 0.99 over 8 seeds, 0.93 with "")."""
        if self.prompt is not None:
            return self.prompt
        from loratool.demo.shapes import concept_pair

        return concept_pair(self.concept, self.pair_seed)[2].caption_without(self.concept)


def write_pair(config: DemoConfig) -> tuple[Path, Path, dict]:
    """The concept pair as PNGs: `plus` is the image the slider's +1 end should look like."""
    from loratool.demo.shapes import concept_pair
    from loratool.files import atomic_path

    minus, plus, minus_scene, plus_scene = concept_pair(config.concept, config.pair_seed)
    paths = {}
    for name, image in (("plus", plus), ("minus", minus)):
        paths[name] = config.output / f"pair_{name}.png"
        with atomic_path(paths[name], force=config.force) as tmp:
            image.save(tmp, format="PNG")
    return paths["plus"], paths["minus"], {"plus": asdict(plus_scene), "minus": asdict(minus_scene)}


def _train(config: DemoConfig, images: list[Path], output: Path, base_loras: list[str] | None = None) -> Path:
    """A copy LoRA of one image, or (two images) a slider trained on the pair: +1 → first, −1 → second. The
    copies are a slider's halves, so they train as `train --pair` does: without multi-resolution noise or
    LoRAs on the 3×3 convs (TrainConfig.OFF; see train.config.COPY_MULTIRES_NOISE), on `config.blocks`."""
    from loratool import train

    settings = (train.SliderConfig if len(images) == 2 else train.TrainConfig)(
        images=images,
        output=output,
        model="demo",
        rank=config.rank,
        alpha=float(config.rank),
        steps=config.steps,
        resolution=128,
        check_every=max(1, config.steps // 3),
        check_seeds=2,
        check_steps=12,
        **train.TrainConfig.OFF,
        blocks=config.blocks,
        vary=config.vary,  # [] unless recipe 2 (DemoConfig), whose halves train one image each
        base_loras=base_loras or [],
        force=config.force,
    )
    train.run(settings)
    return output


def _text_slider(config: DemoConfig, output: Path) -> Path:
    """Recipe 4: +1 is the plus image's full caption, −1 the minus image's, trained in the sweep's prompt (and the
    empty one, as every text slider is)."""
    from loratool import train
    from loratool.demo.shapes import concept_pair

    _, _, minus, plus = concept_pair(config.concept, config.pair_seed)
    settings = train.SliderConfig(
        images=[],
        output=output,
        model="demo",
        positive=plus.caption,
        negative=minus.caption,
        target=config.sweep_prompt(),
        blocks=config.blocks,
        rank=config.rank,
        alpha=float(config.rank),
        steps=config.steps,
        resolution=128,
        force=config.force,
    )
    train.run(settings)
    return output


def make_slider(config: DemoConfig, plus: Path, minus: Path) -> Path:
    """Recipe 2: copy-train both, slider = plus·(+1) + minus·(−1). Recipe 1: plus trained on minus folded in.
    Recipe 3: one LoRA trained on the pair (train --mode slider). Recipe 4: a text slider (see _text_slider)."""
    from loratool import merge

    out = config.output
    if config.recipe == 4:
        return _text_slider(config, out / "slider.safetensors")
    if config.recipe == 3:
        return _train(config, [plus, minus], out / "slider.safetensors")
    if config.recipe == 1:
        base = _train(config, [minus], out / "copy_minus.safetensors")
        return _train(config, [plus], out / "slider.safetensors", base_loras=[f"{base}:1"])
    a = _train(config, [plus], out / "copy_plus.safetensors")
    b = _train(config, [minus], out / "copy_minus.safetensors")
    merge.run(
        merge.MergeConfig(
            inputs=[(a, 1.0), (b, -1.0)], output=out / "slider.safetensors", model="demo", force=config.force
        )
    )
    return out / "slider.safetensors"


def measure_sweep(config: DemoConfig, sweep_dir: Path, pair: tuple[float, float]) -> dict:
    """The concept on every render on the pair's own scale, per seed and summarised (see demo.evaluation)."""
    from PIL import Image

    from loratool.demo.evaluation import evaluate
    from loratool.sample.scales import image_name, scale_labels

    names = dict(zip(config.scales, scale_labels(config.scales), strict=True))
    images = {
        (seed, s): Image.open(sweep_dir / image_name(seed, names[s])).convert("RGB")
        for seed in config.seeds
        for s in config.scales
    }
    return evaluate(images, config.scales, config.seeds, config.concept, pair)


def run(config: DemoConfig) -> Path:
    """Everything under config.output; returns the summary file (demo.json)."""
    from loratool import sample
    from loratool.files import atomic_path

    summary_path = config.output / "demo.json"
    if config.output.exists() and any(config.output.iterdir()) and not config.force:
        raise OutputExistsError(f"{config.output} is not empty; pass --force to overwrite it or choose -o.")
    plus, minus, scenes = write_pair(config)
    log.info("concept pair (%s): %s vs %s", config.concept, plus.name, minus.name)
    slider = make_slider(config, plus, minus)
    sweep_dir, prompt = config.output / "sweep", config.sweep_prompt()
    sample.run(
        sample.SampleConfig(
            output=sweep_dir,
            loras=[str(slider)],
            prompt=prompt,
            scales=config.scales,
            seeds=config.seeds,
            steps=config.sample_steps,
            model="demo",
            refiner="demo",
            lora_start=config.lora_start,
            force=config.force,
        )
    )
    minus_value, plus_value = (_measure_file(p, config.concept) for p in (minus, plus))
    summary = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "pair": scenes,
        "pair_attribute": {"plus": plus_value, "minus": minus_value},
        "slider": str(slider),
        "sweep": str(sweep_dir),
        "sweep_prompt": prompt,
        "copy_psnr_db": copy_psnr(config.output),
        "slider_quality": measure_sweep(config, sweep_dir, (minus_value, plus_value)),
    }
    with atomic_path(summary_path, force=True) as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    return summary_path


def copy_psnr(output: Path) -> dict:
    """Each copy LoRA's last copy check (mean PSNR of empty-prompt renders vs its image), from its report."""
    found = {}
    for report in sorted(output.glob("*.report.json")):
        checks = json.loads(report.read_text()).get("copy_checks") or []
        if checks:
            found[report.name.removesuffix(".report.json")] = round(checks[-1]["mean_psnr"], 2)
    return found


def describe(summary_path: Path) -> list[str]:
    """Where everything is, one line each: what `loratool demo` prints."""
    summary = json.loads(summary_path.read_text())
    sweep = Path(summary["sweep"])
    q = summary["slider_quality"]["summary"]
    start = summary["config"].get("lora_start")
    blocks = summary["config"].get("blocks") or list(UNET_BLOCKS)
    swept = f"swept in the prompt {summary['sweep_prompt']!r}" + (
        f", off for the first {start:g} of the base steps" if start else ""
    )
    vary = summary["config"].get("vary") or []
    checks = ", ".join(f"{k} {v} dB" for k, v in summary["copy_psnr_db"].items()) or "none (no copies)"
    if blocks != list(UNET_BLOCKS):
        swept += f", trained on the {' and '.join(blocks)} blocks"
    if vary:
        swept += f" with {' and '.join(vary)} varied"
    if blocks != list(UNET_BLOCKS) or vary:
        checks += " (made to edit, not to be whole copies)"
    return [
        f"pair: {summary_path.parent / 'pair_minus.png'} (-1) {summary_path.parent / 'pair_plus.png'} (+1)",
        f"copy checks: {checks}",
        f"slider: {summary['slider']}  ({swept})",
        f"sheet: {sweep / 'sheet.png'}  animations: {sweep}/sweep-seed*.gif",
        f"{summary['config']['concept']} vs scale over {len(summary['config']['seeds'])} seeds: mean Spearman "
        f"{q['mean_spearman']:.3f}, largest jump {q['mean_glide']:.2f} of the change (even: "
        f"{1 / max(len(summary['config']['scales']) - 1, 1):.2f}), -1 to +1 spans {q['span']:.2f} of the pair, "
        f"other attributes kept on {q['kept']:.0%} of renders",
        str(summary_path),
    ]


def _measure_file(path: Path, concept: str) -> float:
    from PIL import Image

    from loratool.demo.shapes import measure

    return measure(Image.open(path).convert("RGB"), concept)
