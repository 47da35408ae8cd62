"""Slider mode's data (recipe 3): ONE LoRA trained on a pair, at scale +1 on image A and at −1 on image B.

Both halves of a step see the same noise and timestep (`PairBatches`), so what the LoRA learns is what tells A
from B, the way ai-toolkit's image-reference slider and sd-webui-traintrain's ADDifT train. The prompt is empty,
as in copy mode, and the copy check renders +1 against A and −1 against B. No copies, no merge: the output is
the slider itself.

A text slider (`--positive P --negative N [--target T]`, recipe 4) needs no images: it is Concept Sliders'
text slider, trained on the base's own renders of T (noised afresh each step) so that the LoRA at scale s
predicts what the base predicts in T (and in the empty prompt), moved s × strength along the base's own
estimate with P minus with N. What it learns is the model's direction between two captions, not two pictures.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from loratool.data.images import TrainImage, compare_pair, prepare
from loratool.files import sha256
from loratool.lora.apply import scaled
from loratool.sdxl.index import ModelIndex
from loratool.train.batch import Batch, Guide, PairBatches, RenderBatches
from loratool.train.check import CopyChecker
from loratool.train.conditioning import encode_once, release_encoders
from loratool.train.config import SliderConfig
from loratool.train.model import ADAPTER, Trainee, fold_base_loras, inject_lora, load_base

SCALES = (1.0, -1.0)  # A at +1, B at −1: the file at ±1 is the pair; `merge --calibrate` can restate it
# A text slider's renders, as `sample` makes them by default; a step trains on this many of them at each sign.
RENDER_STEPS, RENDER_GUIDANCE, TEXT_BATCH = 20, 5.0, 4  # TEXT_BATCH: rows per sign, shared by the contexts


def trainees(config: SliderConfig) -> Iterator[tuple[Trainee, Path, dict]]:
    """The one (trainee, slider path, timings) of a pair or of two prompts; a bad pair fails before any model
    loads."""
    if not config.text:
        compare_pair(*config.images)  # same size, so both halves share one noise shape
    started = time.perf_counter()
    pipe = load_base(config)
    if config.text:
        trainee = trainee_from_prompts(pipe, config)
    else:
        plus, minus = (prepare(path, config.resolution) for path in config.images)
        trainee = trainee_from_pair(pipe, config, plus, minus)
    yield trainee, config.output, {"load_and_encode_s": time.perf_counter() - started}


def trainee_from_pair(pipe, config: SliderConfig, plus: TrainImage, minus: TrainImage) -> Trainee:
    """Fold --base-lora files, encode both images once, free the encoders, inject the LoRA. Consumes `pipe`."""
    from diffusers import DDPMScheduler

    index = ModelIndex.of_pipeline(pipe)  # before peft wraps the modules
    base_loras = fold_base_loras(pipe, config, index)
    images = (plus, minus)
    encoded = [encode_once(pipe, image) for image in images]
    vae = release_encoders(pipe, keep_decoder=bool(config.check_every))
    inject_lora(pipe.unet, config)
    checker = None
    if vae is not None:
        sched, seeds, steps = pipe.scheduler.config, config.check_seeds, config.check_steps
        checker = SliderChecker(
            *(CopyChecker.of(vae, sched, e, i.pixels, seeds, steps) for e, i in zip(encoded, images, strict=True))
        )
    pair = [{"file": i.path.name, "sha256": sha256(i.path), "scale": s} for i, s in zip(images, SCALES, strict=True)]
    trainee = Trainee(
        unet=pipe.unet,
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        source=PairBatches(*(Batch(e.latent, e.time_ids, [""], e.prompt_embeds, e.pooled) for e in encoded)),
        keymap=index.keymap,
        device=encoded[0].latent.device,
        data_sha256=hashlib.sha256("".join(p["sha256"] for p in pair).encode()).hexdigest(),
        checker=checker,
        dataset=dataset_record(pair, images),
        base_loras=base_loras,
    )
    if checker:
        trainee.vae_psnr = checker.vae_ceiling()
    return trainee


def trainee_from_prompts(pipe, config: SliderConfig) -> Trainee:
    """A text slider: fold --base-lora files, render --target `renders` times (the latents it trains on, so it
    learns where the model's own images are), encode the three prompts, free the encoders, inject the LoRA."""
    from diffusers import DDPMScheduler

    index = ModelIndex.of_pipeline(pipe)
    base_loras = fold_base_loras(pipe, config, index)
    latents = render_latents(pipe, config.target, config.renders, config.resolution)
    # Sampling runs the LoRA in both halves of classifier-free guidance, the empty negative prompt's too: a
    # slider trained only in --target moves the two halves by different amounts, and guidance multiplies the
    # difference (measured on the demo: a span of 1.31 against the direction's own 0.87, other attributes
    # dragged). So it learns the same move in the empty prompt as well.
    contexts = [(text, *embed(pipe, text)) for text in dict.fromkeys([config.target, ""])]
    plus, minus = (embed(pipe, p) for p in (config.positive, config.negative))
    release_encoders(pipe, keep_decoder=False)
    inject_lora(pipe.unet, config)
    size = config.resolution
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32, device=latents.device)
    rows = max(1, min(TEXT_BATCH // len(contexts), config.renders))
    prompts = {"positive": config.positive, "negative": config.negative, "target": config.target}
    record = prompts | {"strength": config.strength, "renders": config.renders}
    return Trainee(
        unet=pipe.unet,
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        source=RenderBatches(latents, time_ids, contexts, Guide(plus, minus, config.strength), rows),
        keymap=index.keymap,
        device=latents.device,
        data_sha256=hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest(),
        dataset={"metadata": {"loratool_slider": "true", "loratool_text_slider": json.dumps(record)}, "report": record},
        base_loras=base_loras,
    )


@torch.no_grad()
def render_latents(pipe, prompt: str, count: int, size: int) -> torch.Tensor:
    """The base's renders of `prompt` from seeds 0..count-1 (sample's defaults: CFG, 20 steps), as latents."""
    from rich.console import Console
    from rich.progress import Progress

    embeds = embed(pipe, prompt, cfg=True)
    pipe.set_progress_bar_config(disable=True)  # one bar for all renders, not one per render
    latents = []
    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("rendering the target", total=count)
        for seed in range(count):
            generator = torch.Generator("cpu").manual_seed(seed)
            out = pipe(**embeds, num_inference_steps=RENDER_STEPS, guidance_scale=RENDER_GUIDANCE, width=size,
                       height=size, generator=generator, output_type="latent").images  # fmt: skip
            latents.append(out.float())
            progress.advance(task)
    return torch.cat(latents)


def embed(pipe, prompt: str, cfg: bool = False):
    """(prompt_embeds, pooled) of one prompt, weights `(word:1.3)` honoured; with cfg the pipeline's kwargs."""
    from loratool.sdxl.prompts import encode

    e = encode(pipe, prompt, cfg=cfg)
    if cfg:
        return e
    return e["prompt_embeds"].float(), e["pooled_prompt_embeds"].float()


def dataset_record(pair: list[dict], images: tuple[TrainImage, TrainImage]) -> dict:
    """The metadata says it is a slider and of which pair (what `merge --calibrate` and readers look for)."""
    sizes = [{"path": str(i.path), "original_size": i.original_size, "target_size": i.target_size} for i in images]
    return {
        "metadata": {"loratool_slider": "true", "loratool_pair": json.dumps(pair)},
        "report": {"pair": [p | s for p, s in zip(pair, sizes, strict=True)]},
    }


@dataclass
class SliderChecker:
    """The copy check of a slider: +1 rendered against A, −1 against B, from the same fixed seeds."""

    plus: CopyChecker
    minus: CopyChecker

    @property
    def rows(self) -> list:
        return self.plus.rows

    def vae_ceiling(self) -> float:
        return min(self.plus.vae_ceiling(), self.minus.vae_ceiling())

    def check(self, unet, step: int) -> dict:
        halves = {}
        for name, checker, scale in zip(("plus", "minus"), (self.plus, self.minus), SCALES, strict=True):
            with scaled(unet, ADAPTER, scale):
                halves[name] = checker.check(unet, step)
        p = halves["plus"]["psnr"] + halves["minus"]["psnr"]
        s = halves["plus"]["ssim"] + halves["minus"]["ssim"]
        result = dict(step=step, psnr=p, ssim=s, mean_psnr=sum(p) / len(p), min_psnr=min(p), mean_ssim=sum(s) / len(s))
        result["seconds"] = round(halves["plus"]["seconds"] + halves["minus"]["seconds"], 3)
        for name, half in halves.items():
            result[name] = {"mean_psnr": half["mean_psnr"], "min_psnr": half["min_psnr"]}
        return result

    def preview(self):
        """A and its +1 renders on the left, B and its −1 renders on the right, one row per check."""
        from PIL import Image

        left, right = self.plus.preview(), self.minus.preview()
        sheet = Image.new("RGB", (left.width + right.width, max(left.height, right.height)), "white")
        sheet.paste(left, (0, 0))
        sheet.paste(right, (left.width, 0))
        return sheet
