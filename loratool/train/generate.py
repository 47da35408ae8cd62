"""Datasets the base model makes for itself: dreambooth's class images and the "wrong" LoRA's failure images.

Images land in a folder and are reused: a second run finds them and generates nothing. Each file is
written atomically, so an interrupted run leaves only whole images behind. Under data parallelism only
the main process generates; the others wait for it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from loratool.files import atomic_path

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

# What an SDXL image should NOT look like; rendered on purpose, then learned as the trigger word `wrong`.
FAILURES = (
    "blurry", "low quality", "jpeg artifacts", "bad hands", "extra fingers", "cropped", "watermark", "distorted",
    "ugly", "out of focus", "deformed", "bad anatomy", "overexposed", "noisy", "text", "duplicate", "lowres",
)  # fmt: skip
SUBJECTS = (
    "a portrait of a woman", "a man standing in a street", "a dog on the grass", "a cat on a sofa", "a landscape",
    "a city at night", "a bowl of fruit", "a car", "a house", "hands holding a cup", "a group of people", "a bird",
)  # fmt: skip
FAILURES_PER_PROMPT = 4
WEIGHT = 1.3  # compel emphasis of the failure words


@dataclass(frozen=True)
class Job:
    path: Path  # the image to make
    prompt: str
    seed: int
    caption: str | None = None  # written beside the image as <name>.txt


def images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def missing_jobs(folder: Path, wanted: int, stem: str, prompt_of) -> list[Job]:
    """Jobs for `<stem>-NNNNN.png` files not there yet, until the folder holds `wanted` images."""
    have = images_in(folder)
    jobs, index = [], 0
    while len(have) + len(jobs) < wanted:
        path = folder / f"{stem}-{index:05d}.png"
        if not path.exists():
            prompt, caption = prompt_of(index)
            jobs.append(Job(path, prompt, index, caption))
        index += 1
    return jobs


def wrong_prompt(index: int) -> tuple[str, str]:
    """(the prompt rendered, its plain caption): a subject with a rotating handful of failure words, weighted
    `(word)1.3` (sdxl/prompts.py encodes the weights)."""
    subject = SUBJECTS[index % len(SUBJECTS)]
    start = (index * FAILURES_PER_PROMPT) % len(FAILURES)
    words = [FAILURES[(start + k) % len(FAILURES)] for k in range(FAILURES_PER_PROMPT)]
    caption = ", ".join([subject, *words])
    return ", ".join([subject, *(f"({w}){WEIGHT}" for w in words)]), caption


def generate(pipe, jobs: list[Job], resolution: int, steps: int, label: str) -> None:
    """Render every job with the base pipeline (rich progress bar on stderr); the main process only."""
    import torch
    from accelerate import PartialState
    from rich.console import Console
    from rich.progress import Progress

    state = PartialState()
    if jobs and state.is_main_process:
        log.info("generating %d %s with the base model (%d steps each)", len(jobs), label, steps)
        with Progress(console=Console(stderr=True)) as progress:
            task = progress.add_task(label, total=len(jobs))
            for job in jobs:
                generator = torch.Generator("cpu").manual_seed(job.seed)
                prompt = _embeds(pipe, job.prompt)
                image = pipe(
                    **prompt, num_inference_steps=steps, width=resolution, height=resolution, generator=generator
                ).images[0]
                save(image, job)
                progress.advance(task)
    state.wait_for_everyone()


def save(image, job: Job) -> None:
    job.path.parent.mkdir(parents=True, exist_ok=True)
    if job.caption is not None:  # the caption first: an image is only ever there with its caption
        with atomic_path(job.path.with_suffix(".txt")) as tmp:
            tmp.write_text(job.caption, encoding="utf-8")
    with atomic_path(job.path) as tmp:
        image.save(tmp, format="PNG")


def _embeds(pipe, prompt: str) -> dict:
    """The prompt's embeddings with its weights; an unweighted prompt encodes as the pipeline itself would, and
    the pipeline still makes the (zero) negative embeddings."""
    from loratool.sdxl.prompts import encode

    embeds = encode(pipe, prompt, cfg=False)
    return {"prompt_embeds": embeds["prompt_embeds"], "pooled_prompt_embeds": embeds["pooled_prompt_embeds"]}
