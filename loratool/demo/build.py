"""Build the embedded demo model: a small SDXL-architecture base + refiner trained on generated shapes.

    python -m loratool.demo.build --out DIR --device cuda --minutes 8
    python -m loratool.demo.build --out DIR --device cpu --start-from demo --steps 300,2000,400 --batch 32

Stages: generate scenes → VAE → normalise latents to SDXL's scaling factor → cache latents and caption
embeddings → base UNet → refiner UNet (low-noise end) → save `DIR/base` and `DIR/refiner` in fp16.
`--start-from` fine-tunes an existing demo model (`demo`: the shipped one) instead of a seeded init, which is
how a new version of the data reaches the model on a CPU.
The two text encoders stay at their seeded random init: frozen, they still give every caption its own embedding,
the copy machine and sliders train the UNet only, and there is nothing for them to learn that the UNet's
cross-attention cannot. Reproducible with `--steps` on the same device (bitwise on CPU).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from loratool import libraries
from loratool.demo import shapes
from loratool.demo.denoiser import Conditioning, DenoiserData, DenoiserRun, train_denoiser
from loratool.demo.schedule import Budget
from loratool.demo.vae import encode, normalise_latents, psnr, train_vae
from loratool.sdxl.tiny import TinySpec, build_tiny_pipelines

log = logging.getLogger(__name__)

# ~4 M-parameter base, ~2 M refiner, ~1.3 M VAE: under 20 MB in fp16 with both folders' copies of VAE and TE2.
DEMO_SPEC = TinySpec(
    unet_channels=(32, 64, 96),
    transformer_depth=(1, 1, 1),
    heads=(2, 4, 6),
    refiner_channels=(16, 32, 64, 64),
    vae_channels=(32, 64, 64, 64),
    norm_groups=8,
    vae_norm_groups=16,  # 2+ channels per group: with 1, GroupNorm erases each channel's mean and colour is lost
    sample_size=128,
)
STAGE_SHARES = {"vae": 0.25, "base": 0.6, "refiner": 0.15}  # of --minutes: the VAE bounds colour fidelity
AESTHETIC, NEGATIVE_AESTHETIC = 6.0, 2.5  # SDXL img2img pipeline defaults


@dataclass
class BuildConfig:
    out: Path
    device: str = "cuda"
    minutes: float = 8.0  # total wall-clock for the three training stages, split by STAGE_SHARES
    steps: tuple[int, int, int] | None = None  # VAE, base, refiner steps; overrides --minutes (reproducible)
    seed: int = 0
    images: int = 20_000  # generated once, kept on the device as uint8
    size: int = 128
    vae_batch: int = 64
    unet_batch: int = 128
    vae_lr: float = 1e-3
    unet_lr: float = 5e-4
    log_every: int = 100
    spec: TinySpec = field(default_factory=lambda: DEMO_SPEC)
    start_from: str | None = None  # a demo model folder (base/, refiner/) or "demo": fine-tune it
    vae_crop: int = 0  # train the VAE on random crops of this size (0: whole images)
    vae_part: str = "all"  # "decoder": keep the encoder, so the latents the UNets know stay as they are
    pure_noise: float = 0.0  # base UNet only: share of its samples trained from pure noise
    noise_offset: float = 0.0  # base UNet only: offset noise
    decoy: float = 0.0  # base UNet only: share of its samples whose first-step noise holds a decoy scene
    zero_snr: bool = False  # both UNets: velocity on a schedule rescaled to end at pure noise (Lin et al. 2024)

    def budget(self, stage: str) -> Budget:
        index = list(STAGE_SHARES).index(stage)
        steps = self.steps[index] if self.steps else None
        warmup = min(100, steps // 10 + 1) if steps else 100
        return Budget(steps=steps, seconds=60.0 * self.minutes * STAGE_SHARES[stage], warmup=warmup)


def generate(n: int, seed: int, size: int, decoys: bool = False) -> tuple[torch.Tensor, list[str]]:
    """n scenes (or their `shapes.decoy`s) as a uint8 tensor (n, 3, size, size) plus the scenes' captions;
    rendered in parallel chunks when n is large."""
    captions = [shapes.scene_for(seed, i).caption for i in range(n)]
    chunk, workers = 1024, min(16, os.cpu_count() or 1)
    jobs = [(min(chunk, n - s), seed, s, decoys) for s in range(0, n, chunk)]
    if len(jobs) > 1 and workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            pixels = np.concatenate(list(pool.map(shapes.render_pixels, jobs)))
    else:
        pixels = np.concatenate([shapes.render_pixels(job) for job in jobs])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    if size != shapes.SIZE:
        images = torch.nn.functional.interpolate(images.float(), size=size, mode="area").round().to(torch.uint8)
    return images, captions


@torch.no_grad()
def conditioning(pipe, captions: list[str], time_ids: list[float], dropped_time_ids: list[float]) -> Conditioning:
    """Embeddings of each caption through `pipe.encode_prompt` (so training sees exactly what sampling sees)."""
    device = pipe.text_encoder_2.device
    embeds, _, pooled, _ = pipe.encode_prompt(captions, device=device, do_classifier_free_guidance=False)
    ids = torch.tensor([time_ids], device=device)
    return Conditioning(embeds.float(), pooled.float(), ids, torch.tensor([dropped_time_ids], device=device))


def prepare_models(cfg: BuildConfig):
    """Seeded tiny pipelines at the demo widths (or the model to fine-tune), in fp32 for training.

    Text encoders are rounded to fp16 now, as they will be shipped.
    """
    if cfg.start_from is not None:
        base, refiner = _load(cfg.start_from)
    else:
        base, refiner = build_tiny_pipelines(replace(cfg.spec, sample_size=cfg.size), seed=cfg.seed)
    base.register_to_config(force_zeros_for_empty_prompt=False)  # negative = "", which dropout trains
    if cfg.zero_snr:
        for pipe in (base, refiner):
            pipe.scheduler = zero_snr_scheduler(pipe.scheduler)
    for te in (base.text_encoder, base.text_encoder_2):
        te.to(torch.float16).to(torch.float32)
    base.to(cfg.device)
    refiner.unet.to(cfg.device)
    return base, refiner


def zero_snr_scheduler(scheduler):
    """The same sampler on the schedule of Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps
    are Flawed": betas rescaled so the last step is pure noise (SDXL's still holds 7 % of the image, which is
    how a seed sets the layout and colour), velocity as the target (noise says nothing at SNR 0), and "trailing"
    spacing so sampling starts at that last step ("leading" starts at t ≈ 950). Both UNets take it, so the
    hand-off between them sees one schedule."""
    return type(scheduler).from_config(
        scheduler.config, rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"
    )


def _load(source: str):
    """The base and refiner to fine-tune, through the loader every verb uses (fp32 on the CPU; no loading bars)."""
    from loratool.sdxl.models import Runtime, load_pipeline

    base_source, refiner_source = (source, source) if source == "demo" else (f"{source}/base", f"{source}/refiner")
    runtime = Runtime("cpu", "fp32")
    base = load_pipeline(base_source, runtime)
    # the VAE and second text encoder shared, as build_tiny_pipelines does
    refiner = load_pipeline(refiner_source, runtime, refiner=True, vae=base.vae, text_encoder_2=base.text_encoder_2)
    return base, refiner


def run_stages(cfg: BuildConfig, base, refiner) -> dict:
    """Train VAE, base and refiner in place; returns the report's figures."""
    torch.manual_seed(cfg.seed)
    report: dict = {}
    data_clock = Budget()
    images, captions = generate(cfg.images, cfg.seed, cfg.size)
    held_out, _ = generate(min(256, cfg.images), cfg.seed + 1, cfg.size)
    report["data_seconds"] = round(data_clock.elapsed(), 1)
    images, held_out = images.to(cfg.device), held_out.to(cfg.device)
    if cfg.start_from is not None:  # the baseline a fine-tune is judged against
        report["vae_psnr_db_before"] = round(psnr(base.vae, held_out), 2)
    budget = cfg.budget("vae")
    report["vae_steps"], report["vae_loss"] = train_vae(
        base.vae,
        images,
        batch=cfg.vae_batch,
        lr=cfg.vae_lr,
        budget=budget,
        seed=cfg.seed,
        log_every=cfg.log_every,
        crop=cfg.vae_crop,
        decoder_only=cfg.vae_part == "decoder",
    )
    report["vae_seconds"] = round(budget.elapsed(), 1)
    if cfg.start_from is None or (cfg.vae_part == "all" and report["vae_steps"] > 0):
        # only a new encoder needs its latents scaled; re-folding a kept one on other scenes would shift them
        report["latent_mean"], report["latent_std"] = normalise_latents(base.vae, images[:1024])
    report["vae_psnr_db"] = round(psnr(base.vae, held_out), 2)
    table = [""] + sorted(set(captions))  # row 0: the empty prompt
    rows = torch.tensor([table.index(c) for c in captions], device=cfg.device)
    latents = encode(base.vae, images)
    del images
    decoys = None
    if cfg.decoy:
        decoys = encode(base.vae, generate(cfg.images, cfg.seed, cfg.size, decoys=True)[0].to(cfg.device))
    s = float(cfg.size)
    stages = {
        "base": (base.unet, conditioning(base, table, [s, s, 0, 0, s, s], [s, s, 0, 0, s, s]), 1000),
        "refiner": (
            refiner.unet,
            conditioning(refiner, table, [s, s, 0, 0, AESTHETIC], [s, s, 0, 0, NEGATIVE_AESTHETIC]),
            200,
        ),
    }
    for name, (unet, cond, max_t) in stages.items():
        run = DenoiserRun(cfg.unet_batch, cfg.unet_lr, max_t, seed=cfg.seed, log_every=cfg.log_every, name=name)
        if name == "base":
            run = replace(run, pure_noise=cfg.pure_noise, noise_offset=cfg.noise_offset, decoy=cfg.decoy)
        budget = cfg.budget(name)
        data = DenoiserData(latents, rows, cond, decoys if name == "base" else None)
        schedule = (base if name == "base" else refiner).scheduler.config
        report[f"{name}_steps"], report[f"{name}_loss"] = train_denoiser(unet, data, run, budget, schedule)
        report[f"{name}_seconds"] = round(budget.elapsed(), 1)
    return report


def save(base, refiner, out: Path) -> dict:
    """fp16 diffusers folders `out/base` and `out/refiner`; returns their sizes in MB."""
    for module in {id(m): m for pipe in (base, refiner) for m in pipe.components.values()}.values():
        if isinstance(module, torch.nn.Module):
            module.to("cpu").half()  # per module: the pipeline-level .to() warns that fp16 cannot run on CPU
    sizes = {}
    for name, pipe in (("base", base), ("refiner", refiner)):
        pipe.save_pretrained(out / name)
        sizes[f"{name}_mb"] = round(sum(f.stat().st_size for f in (out / name).rglob("*") if f.is_file()) / 1e6, 2)
    sizes["total_mb"] = round(sizes["base_mb"] + sizes["refiner_mb"], 2)
    return sizes


def build(cfg: BuildConfig) -> dict:
    """Train and save the demo model; returns the report (stage times, losses, PSNR, sizes, config)."""
    import time

    start = time.perf_counter()
    if cfg.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    base, refiner = prepare_models(cfg)
    report = run_stages(cfg, base, refiner)
    report |= save(base, refiner, Path(cfg.out))
    report["params_m"] = {
        "base_unet": round(sum(p.numel() for p in base.unet.parameters()) / 1e6, 2),
        "refiner_unet": round(sum(p.numel() for p in refiner.unet.parameters()) / 1e6, 2),
        "vae": round(sum(p.numel() for p in base.vae.parameters()) / 1e6, 2),
    }
    report["total_seconds"] = round(time.perf_counter() - start, 1)
    report["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "spec"}
    report["config"]["spec"] = {k: v for k, v in asdict(cfg.spec).items() if k != "words"}
    log.info("demo model written to %s", cfg.out)
    return report


def parse_args(argv: list[str] | None = None) -> BuildConfig:
    import argparse

    p = argparse.ArgumentParser(prog="python -m loratool.demo.build", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for base/ and refiner/")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--minutes", type=float, default=8.0, help="total training minutes: VAE 25%%, base 60%%, refiner 15%%"
    )
    p.add_argument("--steps", help="VAE,BASE,REFINER steps instead of --minutes (reproducible), e.g. 2000,6000,2000")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=20_000, help="generated training scenes")
    p.add_argument("--size", type=int, default=128, help="training resolution (px); the demo ships at 128")
    p.add_argument("--batch", type=int, default=128, help="UNet batch (the VAE uses half)")
    p.add_argument("--start-from", default=None, help="fine-tune this demo model folder ('demo': the shipped one)")
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--unet-lr", type=float, default=5e-4)
    p.add_argument("--vae-crop", type=int, default=0, help="train the VAE on random crops of this size (px)")
    p.add_argument(
        "--vae-part", choices=("all", "decoder"), default="all", help="train the whole VAE, or its decoder only"
    )
    p.add_argument(
        "--pure-noise", type=float, default=0.0, help="share of base samples trained from pure noise (0: none)"
    )
    p.add_argument("--noise-offset", type=float, default=0.0, help="offset noise for the base UNet (0: none)")
    p.add_argument(
        "--decoy", type=float, default=0.0,
        help="share of base samples started at t ≥ 850 from a decoy: the scene with the words its caption names "
        "redrawn (0: none)",
    )  # fmt: skip
    p.add_argument(
        "--zero-snr", action="store_true", help="train both UNets for a zero-terminal-SNR schedule (v-prediction)"
    )
    p.add_argument("--log-every", type=int, default=100)
    a = p.parse_args(argv)
    steps = tuple(int(s) for s in a.steps.split(",")) if a.steps else None
    if steps is not None and len(steps) != 3:
        p.error("--steps takes three numbers: VAE,BASE,REFINER")
    if not 0 <= a.decoy <= 1 or (a.decoy and a.pure_noise):
        p.error("--decoy is a share from 0 to 1, and cannot be combined with --pure-noise (both set the first steps)")
    return BuildConfig(
        out=a.out, device=a.device, minutes=a.minutes, steps=steps, seed=a.seed, images=a.images, size=a.size,
        vae_batch=max(a.batch // 2, 1), unet_batch=a.batch, start_from=a.start_from,
        vae_lr=a.vae_lr, unet_lr=a.unet_lr, vae_crop=a.vae_crop, vae_part=a.vae_part, log_every=a.log_every,
        pure_noise=a.pure_noise, noise_offset=a.noise_offset, zero_snr=a.zero_snr, decoy=a.decoy,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    libraries.quiet()  # our INFO lines only: the root level would let every library's chatter through
    cfg = parse_args(argv)
    if cfg.device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    report = build(cfg)
    print(json.dumps(report))  # the one result line on stdout


if __name__ == "__main__":
    main()
