"""Slider mode's data (recipe 3): ONE LoRA trained on a pair, at scale +1 on image A and at −1 on image B.

Both halves of a step see the same noise and timestep (`PairBatches`), so what the LoRA learns is what tells A
from B, the way ai-toolkit's image-reference slider and sd-webui-traintrain's ADDifT train. The prompt is empty,
as in copy mode, and the copy check renders +1 against A and −1 against B. No copies, no merge: the output is
the slider itself.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from loratool.data.images import TrainImage, compare_pair, prepare
from loratool.files import sha256
from loratool.lora.apply import scaled
from loratool.sdxl.index import ModelIndex
from loratool.train.batch import Batch, PairBatches
from loratool.train.check import CopyChecker
from loratool.train.conditioning import encode_once, release_encoders
from loratool.train.config import SliderConfig
from loratool.train.model import ADAPTER, Trainee, fold_base_loras, inject_lora, load_base

SCALES = (1.0, -1.0)  # A at +1, B at −1: the file at ±1 is the pair; `merge --calibrate` can restate it


def trainees(config: SliderConfig) -> Iterator[tuple[Trainee, Path, dict]]:
    """The one (trainee, slider path, timings) of a pair; a bad pair fails before any model loads."""
    compare_pair(*config.images)  # same size, so both halves share one noise shape
    started = time.perf_counter()
    pipe = load_base(config)
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
