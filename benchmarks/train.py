"""Copy-machine training: loratool's loop vs a straightforward one (diffusers' train_dreambooth_lora_sdxl style).

The straightforward loop keeps the VAE and both text encoders in memory and encodes the image and the
empty prompt at EVERY step; loratool encodes once and frees them. Same rank, targets, steps, optimizer.
Each variant runs in its own process, so peak memory is its own. Prints ONE JSON line.

    python benchmarks/train.py                # CPU, tiny SDXL, 64 px: it/s and peak RSS, and the ratios
    python benchmarks/train.py --full         # CUDA, full-size SDXL (random init), 1024², rank 16, bf16,
                                              # with/without gradient checkpointing and 8-bit Adam
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_pipeline(full: bool):
    """Tiny SDXL (CPU), or full-size SDXL from the reference configs, random init, on CUDA."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from loratool.sdxl import reference as ref
    from loratool.sdxl.tiny import build_tiny_pipelines, build_tokenizer, scheduler

    if not full:
        return build_tiny_pipelines()[0]
    with torch.device("cuda"):
        unet = UNet2DConditionModel(**ref.BASE_UNET).to(torch.bfloat16)
        te1 = CLIPTextModel(CLIPTextConfig(**ref.TEXT_ENCODER)).to(torch.bfloat16)
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**ref.TEXT_ENCODER_2)).to(torch.bfloat16)
        vae = AutoencoderKL(**ref.VAE)  # fp32: SDXL's VAE overflows in half precision
    tok1, tok2 = build_tokenizer(), build_tokenizer(pad_token="!")
    pipe = StableDiffusionXLPipeline(vae, te1, te2, tok1, tok2, unet, scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_image(root: Path, size: int) -> Path:
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size]
    array = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], -1).astype(np.uint8)
    path = root / "image.png"
    Image.fromarray(array).save(path)
    return path


def ours(args, config, pipe, image) -> float:
    """loratool's own code path (encode once, free encoders); returns it/s of the training loop."""
    from loratool.train.checkpoint import TrainState
    from loratool.train.copy_machine import trainee_from_pipeline
    from loratool.train.loop import fit

    trainee = trainee_from_pipeline(pipe, config, image)
    timings: dict = {}
    fit(config, trainee, TrainState(), Path(tempfile.mkdtemp()) / "ckpt", timings)
    return timings["steps_run"] / timings["train_s"]


def straightforward(args, config, pipe, image) -> float:
    """Everything stays loaded; the image and the empty prompt are encoded at every step."""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    from loratool.train.loop import make_optimizer
    from loratool.train.model import inject_lora

    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not args.full)
    device = pipe.unet.device
    inject_lora(pipe.unet, config)  # same targets, rank and init as ours
    params = [p for p in pipe.unet.parameters() if p.requires_grad]
    unet, optimizer = accelerator.prepare(pipe.unet, make_optimizer(config, params))
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    pixels = image.pixels[None].to(device, torch.float32)
    time_ids = torch.tensor([image.time_ids()], dtype=torch.float32, device=device)
    start = time.perf_counter()
    for _ in range(config.steps):
        with torch.no_grad():
            latent = pipe.vae.encode(pixels).latent_dist.sample() * pipe.vae.config.scaling_factor
            embeds, _, pooled, _ = pipe.encode_prompt("", device=device, do_classifier_free_guidance=False)
        noise = torch.randn_like(latent)
        t = torch.randint(0, sched.config.num_train_timesteps, (1,), device=device)
        pred = unet(
            sched.add_noise(latent, noise, t),
            t,
            embeds,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        ).sample
        accelerator.backward(F.mse_loss(pred.float(), noise.float()))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if args.full:
        torch.cuda.synchronize()
    return config.steps / (time.perf_counter() - start)


def child(args) -> None:
    """One variant in this process; prints its JSON line."""
    import resource

    import torch

    from loratool.data.images import prepare
    from loratool.train.config import TrainConfig

    if not args.full:
        torch.set_num_threads(1)  # the CPU numbers are for a shared 2-core machine
    torch.manual_seed(0)
    root = Path(tempfile.mkdtemp())
    size = 1024 if args.full else 64
    image_path = make_image(root, size)
    config = TrainConfig(
        images=[image_path],
        steps=args.steps,
        rank=16 if args.full else 4,
        alpha=16 if args.full else 4,
        resolution=size,
        check_every=0,
        mixed_precision="bf16" if args.full else "no",
        gradient_checkpointing="ckpt" in args.variant,
        optimizer="adamw8bit" if "8bit" in args.variant else "adamw",
        # the loop is what is compared: the straightforward one draws plain noise, and the recorded figures
        # are of attention and linear LoRAs, so neither copy default of 2026-12-07 applies here
        **TrainConfig.OFF,
    )
    import accelerate  # noqa: F401  libraries first: their import is not training memory
    import diffusers  # noqa: F401
    import peft  # noqa: F401

    import loratool.train.copy_machine  # noqa: F401
    import loratool.train.loop  # noqa: F401

    before_mb = _rss_now_mb()  # what training adds is measured above this
    pipe = build_pipeline(args.full)
    if args.full:
        torch.cuda.reset_peak_memory_stats()
    loop = straightforward if args.variant == "straightforward" else ours
    rate = loop(args, config, pipe, prepare(image_path, size))
    out = {"variant": args.variant, "it_per_s": round(rate, 3)}
    out["rss_peak_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out["rss_training_mb"] = round(out["rss_peak_mb"] - before_mb, 1)
    if args.full:
        out["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="full-size SDXL on CUDA")
    parser.add_argument("--steps", type=int, default=None, help="training steps per variant")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # set when this script runs itself as a child
    args = parser.parse_args()
    args.steps = args.steps or (20 if args.full else 30)
    if args.variant:
        return child(args)
    variants = ["straightforward", "ours"]
    if args.full:
        variants += ["ours+ckpt", "ours+8bit", "ours+ckpt+8bit"]
    results = {}
    for variant in variants:
        cmd = [sys.executable, __file__, "--variant", variant, "--steps", str(args.steps)] + (["--full"] * args.full)
        done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"PYTHONPATH": _root()})
        if done.returncode:
            sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    memory = "cuda_max_allocated_mb" if args.full else "rss_training_mb"
    base, mine = results["straightforward"], results["ours"]
    print(
        json.dumps(
            {
                "benchmark": "train-full" if args.full else "train-tiny-cpu",
                "steps": args.steps,
                "speedup": round(mine["it_per_s"] / base["it_per_s"], 3),
                "memory_ratio": round(mine[memory] / base[memory], 3),
                "memory_metric": memory,
                "variants": results,
            }
        )
    )


def _rss_now_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _root() -> str:
    return os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")) if p)


if __name__ == "__main__":
    main()
