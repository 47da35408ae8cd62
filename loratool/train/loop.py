"""The copy-machine loop: one image, empty prompt, a UNet LoRA trained until the model reproduces the image.

Reads top to bottom: run → train_one (load, encode once, inject) → fit (the loop) → small helpers.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from loratool.data.images import TrainImage, compare_pair, prepare
from loratool.errors import InputError, LoratoolError
from loratool.files import check_writable
from loratool.train import checkpoint
from loratool.train.checkpoint import TrainState
from loratool.train.config import TrainConfig, sidecars
from loratool.train.model import ADAPTER, Trainee, load_trainee
from loratool.train.progress import TrainProgress
from loratool.train.record import write_outputs

log = logging.getLogger(__name__)
EVAL_SEED, EVAL_POINTS = 1234, 8


class TrainingInterrupted(LoratoolError):
    """Ctrl-C: the LoRA of the current step was written; the shell's convention for SIGINT is 130."""

    exit_code = 130


def run(config: TrainConfig) -> list[Path]:
    """Train one LoRA per image (two for --pair, identical settings); returns every file written."""
    preflight(config)
    lora_paths = config.lora_paths()
    for path in lora_paths:
        for p in (path, sidecars(path)["report"], sidecars(path)["preview"]):
            check_writable(p, config.force or config.resume)  # --resume overwrites its own interrupted outputs
    if config.pair:
        compare_pair(*config.images)
    images = [prepare(p, config.resolution) for p in config.images]
    written: list[Path] = []
    for image, path in zip(images, lora_paths, strict=True):
        written += train_one(config, image, path)
    return written


def preflight(config: TrainConfig) -> None:
    """Device-dependent checks, before any model is loaded."""
    cuda = torch.cuda.is_available() and (config.device or "cuda").startswith("cuda")
    if config.optimizer == "adamw8bit" and not cuda:
        raise InputError("--optimizer adamw8bit needs a CUDA GPU (bitsandbytes); use --optimizer adamw here.")
    if config.quantize_base and not cuda:
        raise InputError(f"--quantize-base {config.quantize_base} needs a CUDA GPU (bitsandbytes); drop it here.")
    if config.quantize_base and config.base_loras:
        raise InputError("--base-lora cannot be folded into a --quantize-base model: drop one of them.")


def train_one(config: TrainConfig, image: TrainImage, lora_path: Path) -> list[Path]:
    started = time.perf_counter()
    trainee = load_trainee(config, image)
    timings = {"load_and_encode_s": time.perf_counter() - started}
    state = TrainState()
    try:
        fit(config, trainee, state, sidecars(lora_path)["checkpoints"], timings)
    except KeyboardInterrupt:
        paths = write_outputs(config, trainee, state, lora_path, timings, interrupted=True)
        raise TrainingInterrupted(
            f"interrupted at step {state.step}; wrote {paths[0]} (continue with --resume if --save-every was set)."
        ) from None
    return write_outputs(config, trainee, state, lora_path, timings)


def fit(config: TrainConfig, trainee: Trainee, state: TrainState, ckpt_dir: Path, timings: dict) -> None:
    """The loop. Mutates `state` step by step, so an interrupt leaves it describing the last finished step."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # accelerate keeps a process-wide singleton; --pair and tests make several
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation,
        cpu=trainee.device.type == "cpu",
    )
    params = [p for p in trainee.unet.parameters() if p.requires_grad]
    unet, optimizer = accelerator.prepare(trainee.unet, make_optimizer(config, params))
    generator = torch.Generator(trainee.device).manual_seed(config.seed)
    settings = config.record() | {"image_sha256": trainee.image_sha256}
    if config.resume and checkpoint.latest(ckpt_dir):
        state.__dict__.update(checkpoint.load(ckpt_dir, unet, optimizer, generator, settings).__dict__)
    if state.eval_loss_start is None:
        state.eval_loss_start = eval_loss(unet, trainee)
    checker = trainee.checker
    if checker and not state.checks:
        state.checks.append(checker.check(unet, 0))  # step 0: what the base model renders
    loop_start, first_step = time.perf_counter(), state.step
    with TrainProgress(config.steps, state.step) as progress:
        while state.step < config.steps:
            loss = train_step(accelerator, unet, optimizer, params, trainee, generator, config)
            state.step += 1
            state.losses.append(loss)
            if checker and (state.step % config.check_every == 0 or state.step == config.steps):
                state.checks.append(checker.check(unet, state.step))
            progress.update(state.step, loss, state.checks[-1]["mean_psnr"] if state.checks else None)
            if config.save_every and state.step % config.save_every == 0:
                checkpoint.save(ckpt_dir, state, unet, optimizer, generator, settings)
            if copied(config, state):
                log.info("copied at step %d: mean PSNR %.2f dB", state.step, state.checks[-1]["mean_psnr"])
                break
    timings["train_s"] = time.perf_counter() - loop_start
    timings["steps_run"] = state.step - first_step
    timings["eval_loss_end"] = eval_loss(unet, trainee)


def train_step(accelerator, unet, optimizer, params, trainee: Trainee, generator, config: TrainConfig) -> float:
    """One optimizer step over `gradient_accumulation` noise draws; returns the mean loss."""
    total = 0.0
    for _ in range(config.gradient_accumulation):
        with accelerator.accumulate(unet):
            loss = diffusion_loss(unet, trainee, generator, config.noise_offset, config.min_snr_gamma)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        total += loss.item()  # a sync point, once per micro-step; the progress bar needs it anyway
    return total / config.gradient_accumulation


def diffusion_loss(unet, trainee: Trainee, generator, noise_offset=0.0, min_snr_gamma=None, timestep=None):
    """MSE between the UNet's prediction and its target (noise, or velocity for v-prediction models).

    A fixed `timestep` is for evaluation; training draws one per call.
    """
    sched, latent = trainee.noise_scheduler, trainee.cond.latent
    noise = torch.randn(latent.shape, generator=generator, device=latent.device)
    if noise_offset:  # shifts the mean per channel, so the model can learn very dark/bright images
        offset = torch.randn((1, latent.shape[1], 1, 1), generator=generator, device=latent.device)
        noise = noise + noise_offset * offset
    if timestep is None:
        t = torch.randint(0, sched.config.num_train_timesteps, (1,), generator=generator, device=latent.device)
    else:
        t = torch.tensor([timestep], device=latent.device)
    noisy = sched.add_noise(latent, noise, t)
    pred = unet(noisy, t, **trainee.cond.unet_kwargs()).sample
    target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latent, noise, t)
    loss = F.mse_loss(pred.float(), target.float())
    if min_snr_gamma:
        loss = loss * min_snr_weight(sched, t, min_snr_gamma)
    return loss


def min_snr_weight(sched, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ (Hang et al. 2023): stop the easy, low-noise timesteps from dominating the loss."""
    ac = sched.alphas_cumprod.to(t.device)[t].float()
    snr = ac / (1 - ac)
    clipped = torch.clamp(snr, max=gamma)
    return (clipped / (snr + 1) if sched.config.prediction_type == "v_prediction" else clipped / snr).mean()


@torch.no_grad()
def eval_loss(unet, trainee: Trainee) -> float:
    """Loss at fixed noise and evenly spaced timesteps: comparable across steps, unlike the training loss."""
    generator = torch.Generator(trainee.device).manual_seed(EVAL_SEED)
    n = trainee.noise_scheduler.config.num_train_timesteps
    timesteps = torch.linspace(0, n - 1, EVAL_POINTS).long().tolist()
    losses = [diffusion_loss(unet, trainee, generator, timestep=t) for t in timesteps]
    return float(torch.stack(losses).mean().item())


def make_optimizer(config: TrainConfig, params: list):
    if config.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=config.lr, weight_decay=1e-2)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=1e-2)


def copied(config: TrainConfig, state: TrainState) -> bool:
    if config.stop_when_copied is None or not state.checks or state.checks[-1]["step"] != state.step:
        return False
    return state.checks[-1]["mean_psnr"] >= config.stop_when_copied


__all__ = ["ADAPTER", "TrainingInterrupted", "run"]
