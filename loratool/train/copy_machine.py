"""Copy-machine mode's data: one image (or each image of a --pair) with the empty prompt, encoded once.

The copy machine overfits a LoRA until the base renders the image from the empty prompt; `trainees` hands the
loop one Trainee per image, loading the base for the next image only after the previous LoRA is written.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from loratool.data.images import TrainImage, compare_pair, load_image, prepare, turn_hue
from loratool.files import sha256
from loratool.sdxl.index import ModelIndex
from loratool.train.batch import Batch, OneBatch, Variants
from loratool.train.check import CopyChecker
from loratool.train.conditioning import encode_latent, encode_once, release_encoders
from loratool.train.config import VARY_TURNS, TrainConfig
from loratool.train.model import Trainee, fold_base_loras, inject_lora, load_base


def trainees(config: TrainConfig) -> Iterator[tuple[Trainee, Path, dict]]:
    """(trainee, LoRA path, timings) per image; a bad image fails before any model loads."""
    if config.pair:
        compare_pair(*config.images)
    for image in config.images:
        load_image(image)
    for image, path in zip(config.images, config.lora_paths(), strict=True):
        started = time.perf_counter()
        trainee = load_trainee(config, image)
        yield trainee, path, {"load_and_encode_s": time.perf_counter() - started}


def load_trainee(config: TrainConfig, image: Path) -> Trainee:
    """Load the base (quantized on request; its size is the default --resolution), then prepare it for training."""
    pipe = load_base(config)
    return trainee_from_pipeline(pipe, config, prepare(image, config.resolution))


def trainee_from_pipeline(pipe, config: TrainConfig, image: TrainImage) -> Trainee:
    """Fold --base-lora files, encode once, free the encoders, inject the LoRA. Consumes `pipe`."""
    from diffusers import DDPMScheduler

    index = ModelIndex.of_pipeline(pipe)  # before peft wraps the modules
    base_loras = fold_base_loras(pipe, config, index)
    encoded = encode_once(pipe, image)
    # --vary hue: the same turns of the wheel for both images of the pair (VARY_TURNS[0] = 0: the image itself);
    # only the latent changes, the empty prompt's embeddings and the micro-conditioning are the image's
    turns = VARY_TURNS[1:] if "hue" in config.vary else ()
    varied = [encoded] + [
        replace(encoded, latent=encode_latent(pipe.vae, turn_hue(image.pixels, d)[None].to(encoded.latent.device)))
        for d in turns
    ]
    vae = release_encoders(pipe, keep_decoder=bool(config.check_every))
    inject_lora(pipe.unet, config)
    checker = None
    if vae is not None:
        checker = CopyChecker.of(
            vae, pipe.scheduler.config, encoded, image.pixels, config.check_seeds, config.check_steps
        )
    trainee = Trainee(
        unet=pipe.unet,
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        source=Variants([_batch(e) for e in varied]) if len(varied) > 1 else OneBatch(_batch(encoded)),
        keymap=index.keymap,
        device=encoded.latent.device,
        data_sha256=sha256(image.path),
        checker=checker,
        image=image,
        base_loras=base_loras,
    )
    if checker:
        trainee.vae_psnr = checker.vae_ceiling()
    return trainee


def _batch(encoded) -> Batch:
    return Batch(encoded.latent, encoded.time_ids, [""], encoded.prompt_embeds, encoded.pooled)
