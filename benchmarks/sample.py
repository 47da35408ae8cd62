"""Per-image time of a 5-point slider sweep vs the plain pipeline (no LoRA), same settings, one process.

Tiny SDXL on CPU by default; `--full` builds random-init full-size SDXL base + refiner from
loratool/sdxl/reference.py on CUDA (fp16, 1024², 30 steps). Prints ONE JSON line.
Both ways of switching are timed: fused (weights merged per scale, the default) and unfused adapters.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_lora_files import random_network  # noqa: E402


def full_pipelines(device: str):
    from diffusers import AutoencoderKL, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from diffusers import UNet2DConditionModel as UNet
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from loratool.sdxl import reference as ref
    from loratool.sdxl.tiny import build_tokenizer, scheduler

    with torch.device(device):
        te1 = CLIPTextModel(CLIPTextConfig(**ref.TEXT_ENCODER))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**ref.TEXT_ENCODER_2))
        vae, unet, refiner_unet = AutoencoderKL(**ref.VAE), UNet(**ref.BASE_UNET), UNet(**ref.REFINER_UNET)
    tok1, tok2 = build_tokenizer(), build_tokenizer(pad_token="!")
    base = StableDiffusionXLPipeline(vae, te1, te2, tok1, tok2, unet, scheduler())
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae, None, te2, None, tok2, refiner_unet, scheduler(), requires_aesthetics_score=True
    )
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
        pipe.to(device, torch.float16)
    return base, refiner


def tiny_pipelines():
    from loratool.sdxl.tiny import build_tiny_pipelines

    return build_tiny_pipelines()


def timed(fn, n: int) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # a sync point: time the GPU work, not the launch
    t = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--full", action="store_true", help="full-size random SDXL on CUDA")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    full = args.full and torch.cuda.is_available()
    torch.set_num_threads(1 if not full else torch.get_num_threads())
    base, refiner = full_pipelines("cuda") if full else tiny_pipelines()
    steps = args.steps or (30 if full else 4)

    from loratool.lora.io import keymap_for, write_lora
    from loratool.sample import SampleConfig
    from loratool.sample.pipeline import embeddings, render
    from loratool.sample.sweep import make_prompt, make_schedule, render_sweep
    from loratool.sdxl.adapters import Adapters, read_loras

    scales = [-1.0, -0.5, 0.0, 0.5, 1.0]
    config = SampleConfig(prompt="a red circle", steps=steps, refiner="refiner", loras=["x"], scales=scales)
    prompt = make_prompt(config)
    refiner_embeds, embeds = embeddings(refiner, prompt), embeddings(base, prompt)
    plan = make_schedule(base, config)

    def plain():
        for i in range(len(scales)):
            render(base, refiner, prompt, plan, i, embeds, refiner_embeds)

    plain()  # warm-up
    plain_s = [timed(plain, len(scales))]
    lora = Path(tempfile.mkdtemp()) / "slider.safetensors"
    network = random_network(base, seed=1, te=False)
    write_lora(network, lora, keymap=keymap_for(base.unet))
    result = {"model": "sdxl-random-full" if full else "tiny", "device": str(base.device), "steps": steps}
    sweeps = {}
    for mode in ("fold", "fuse", "adapters"):  # fold first: the other two leave peft wrappers behind
        adapters = Adapters(base, read_loras(base, [(lora, 1.0)], 0), mode=mode)
        sweeps[mode] = timed(
            lambda a=adapters: render_sweep(base, refiner, config, a, prompt, refiner_embeds, 0), len(scales)
        )
        adapters.set([0.0])
        if mode == "fold":
            plain_s.append(timed(plain, len(scales)))  # interleaved: shared CPUs drift
    result["plain_s_per_image"] = round(min(plain_s), 4)
    for mode, seconds in sweeps.items():
        result[f"sweep_{mode}_s_per_image"] = round(seconds, 4)
        result[f"ratio_{mode}"] = round(seconds / result["plain_s_per_image"], 3)
    result["lora_modules"] = len(network)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
