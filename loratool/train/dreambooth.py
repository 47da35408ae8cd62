"""Dreambooth and the "wrong" LoRA's data: a folder of captioned images (plus class images) for the shared loop.

Reads top to bottom: trainees → instances (folder, captions) → dataset (class / wrong images the base makes)
→ trainee_from_folder (fold, encode into cached pools, free the encoders, inject LoRAs); `train.run` hands
the trainee to the loop.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch

from loratool.data.images import TrainImage, prepare
from loratool.errors import InputError
from loratool.files import atomic_path, sha256
from loratool.sdxl.index import ModelIndex
from loratool.sdxl.models import load_pipeline
from loratool.train import generate
from loratool.train.batch import BucketSource, Example, Pool
from loratool.train.conditioning import encode_latent, release_encoders
from loratool.train.config import DreamboothConfig
from loratool.train.model import ADAPTER, Trainee, fold_base_loras, inject_lora, settle_resolution, weights_runtime
from loratool.train.text import TextEncoders, inject_text_lora, text_encoders

log = logging.getLogger(__name__)

Item = tuple[Path, str]  # an image and its caption


def trainees(config: DreamboothConfig) -> Iterator[tuple[Trainee, Path, dict]]:
    """The one (trainee, LoRA path, timings) of a dataset; the base also makes the class / wrong images."""
    check_processes(config)
    items = instances(config.images[0], config.prompt) if config.mode == "dreambooth" else []
    started = time.perf_counter()
    pipe = load_pipeline(config.model, weights_runtime(config), config=config.model_config)
    settle_resolution(config, pipe)
    notes = {}
    if config.mode == "wrong":
        items, notes["loratool_prompt_weighting"] = wrong_dataset(pipe, config)
    classes = class_images(pipe, config) if config.prior else []
    trainee = trainee_from_folder(pipe, config, items, classes)
    trainee.dataset["metadata"] |= notes
    yield trainee, config.output, {"load_and_encode_s": time.perf_counter() - started}


def instances(folder: Path, prompt: str, use_captions: bool = True) -> list[Item]:
    """The folder's images with their captions: `<name>.txt` beside an image overrides `prompt`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder of instance images (--mode dreambooth takes a folder).")
    if not any(folder.iterdir()):
        raise InputError(f"{folder} is empty: put the instance images (PNG, JPEG, WebP) in it.")
    images = generate.images_in(folder)
    if not images:
        raise InputError(f"{folder} holds no PNG, JPEG or WebP images to train on.")
    return [(path, caption(path, prompt) if use_captions else prompt) for path in images]


def caption(image: Path, default: str) -> str:
    text_file = image.with_suffix(".txt")
    if not text_file.is_file():
        return default
    try:
        text = text_file.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        raise InputError(f"{text_file} is not UTF-8 text: re-save the caption as UTF-8.") from None
    return text or default


def class_images(pipe, config: DreamboothConfig) -> list[Item]:
    """--num-class-images images of --class-prompt from the class folder, generating those missing."""
    folder = config.class_folder()
    jobs = generate.missing_jobs(folder, config.num_class_images, "class", lambda i: (config.class_prompt, None))
    generate.generate(pipe, jobs, config.resolution, config.generate_steps, "class images")
    return [(path, config.class_prompt) for path in generate.images_in(folder)[: config.num_class_images]]


def wrong_dataset(pipe, config: DreamboothConfig) -> tuple[list[Item], str]:
    """--num-images failure images (captions beside them), all trained on the instance prompt `wrong`;
    also how the failure words were emphasised in the images generated now."""
    folder = config.wrong_folder()
    jobs = generate.missing_jobs(folder, config.num_images, "wrong", generate.wrong_prompt)
    generate.generate(pipe, jobs, config.resolution, config.generate_steps, "wrong images")
    items = [(path, config.prompt) for path in generate.images_in(folder)[: config.num_images]]
    return items, f"compel (word){generate.WEIGHT}"


def check_processes(config: DreamboothConfig) -> None:
    from accelerate import PartialState

    count = PartialState().num_processes
    if config.batch_size % count:
        raise InputError(f"--batch-size {config.batch_size} must be a multiple of the {count} processes.")


def trainee_from_folder(pipe, config: DreamboothConfig, items: list[Item], classes: list[Item]) -> Trainee:
    """Fold --base-lora files, encode every image and caption once (cached), free what training does not
    need, inject the LoRAs. Consumes `pipe`."""
    from diffusers import DDPMScheduler

    index = ModelIndex.of_pipeline(pipe)  # before peft wraps the modules
    base_loras = fold_base_loras(pipe, config, index)
    cache = Cache(config, base_loras)
    text = text_encoders(pipe)
    instance = pool(pipe.vae, text, cache, items, config, prior=False)
    prior = pool(pipe.vae, text, cache, classes, config, prior=True) if classes else None
    release_encoders(pipe, keep_decoder=False, keep_text=config.train_text_encoder)
    inject_lora(pipe.unet, config)
    trained_text = None
    if config.train_text_encoder:
        for encoder in text.encoders:
            inject_text_lora(encoder, config.rank, config.alpha, ADAPTER)
        trained_text = text
    return Trainee(
        unet=pipe.unet,
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        source=BucketSource(instance, prior, config.batch_size),
        keymap=index.keymap,
        device=pipe.unet.device,
        data_sha256=cache.dataset_sha256(items + classes),
        text=trained_text,
        dataset=dataset_record(config, items, classes),
        base_loras=base_loras,
    )


def pool(vae, text: TextEncoders, cache: Cache, items: list[Item], config: DreamboothConfig, prior: bool) -> Pool:
    """Latents by image and embeddings by caption (none kept when the text encoders train: re-encoded)."""
    images = [prepare(path, config.resolution) for path, _ in items]
    examples = [
        Example(cache.latent(vae, image).to(text.device), image.time_ids(), text_of)
        for image, (_, text_of) in zip(images, items, strict=True)
    ]
    embeds = None
    if not config.train_text_encoder:
        captions = dict.fromkeys(text_of for _, text_of in items)
        embeds = {c: tuple(t.to(text.device) for t in cache.embeddings(text, c)) for c in captions}
    return Pool(examples, embeds, prior)


class Cache:
    """Latents (by image sha256 + resolution + model) and embeddings (by caption + model), in memory and,
    with --cache-dir, on disk as safetensors, so later runs skip the VAE and the text encoders."""

    def __init__(self, config: DreamboothConfig, base_loras: list[dict]) -> None:
        self.folder, self.resolution = config.cache_dir, config.resolution
        self.model = json.dumps([config.model, config.model_config, base_loras])
        self.hashes: dict[Path, str] = {}

    def image_sha256(self, path: Path) -> str:
        if path not in self.hashes:
            self.hashes[path] = sha256(path)
        return self.hashes[path]

    def latent(self, vae, image: TrainImage) -> torch.Tensor:
        key = _digest("latent", self.image_sha256(image.path), self.resolution, self.model)
        return self._cached(key, lambda: {"latent": encode_latent(vae, image.pixels[None])[0]})["latent"]

    def embeddings(self, text: TextEncoders, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        def compute():
            embeds, pooled = text.encode_frozen([caption])
            return {"prompt_embeds": embeds[0], "pooled": pooled[0]}

        found = self._cached(_digest("text", caption, self.model), compute)
        return found["prompt_embeds"], found["pooled"]

    def _cached(self, key: str, compute) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file, save_file

        path = self.folder / f"{key}.safetensors" if self.folder else None
        if path is not None and path.is_file():
            return load_file(path)
        tensors = {k: v.detach().cpu().contiguous() for k, v in compute().items()}
        if path is not None:
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp))
        return tensors

    def dataset_sha256(self, items: list[Item]) -> str:
        return _digest(*sorted(f"{self.image_sha256(p)} {c}" for p, c in items))


def _digest(*parts) -> str:
    return hashlib.sha256("\n".join(map(str, parts)).encode()).hexdigest()


def dataset_record(config: DreamboothConfig, items: list[Item], classes: list[Item]) -> dict:
    """What the LoRA was trained on, for its metadata (strings) and the report."""
    tags = Counter(tag.strip() for _, text_of in items for tag in text_of.split(",") if tag.strip())
    folder = config.images[0].name if config.images else config.wrong_folder().name
    metadata = {
        "loratool_trigger": config.prompt,
        "loratool_instance_prompt": config.prompt,
        "loratool_num_images": str(len(items)),
        "loratool_class_prompt": config.class_prompt or "",
        "loratool_num_class_images": str(len(classes)),
        "loratool_prior_loss_weight": str(config.prior_loss_weight if classes else 0.0),
        "loratool_train_text_encoder": str(config.train_text_encoder).lower(),
        "ss_num_train_images": str(len(items)),
        "ss_tag_frequency": json.dumps({folder: dict(tags)}),
    }
    report = {"images": [str(p) for p, _ in items], "captions": sorted(set(c for _, c in items))}
    report["class_images"] = [str(p) for p, _ in classes]
    return {"metadata": metadata, "report": report}
