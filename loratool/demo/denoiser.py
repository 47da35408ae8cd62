"""Training a UNet (base or refiner) on cached latents with its schedule's objective (SDXL's epsilon, or
velocity on a zero-terminal-SNR schedule), EMA and caption dropout."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loratool.demo.schedule import Budget
from loratool.train.loss import PURE_NOISE_FROM, draw_noise, from_pure_noise, implied_noise

log = logging.getLogger(__name__)

MIN_SNR_GAMMA = 5.0  # min-SNR-γ loss weighting: converges several times faster on short budgets


@dataclass
class Conditioning:
    """Per-caption text embeddings (row 0 is the empty prompt) and the SDXL time ids of kept/dropped captions.

    Dropped captions train the empty prompt: copy-machine LoRAs train with "" and classifier-free guidance uses it
    as the negative. The refiner's dropped rows get the negative aesthetic score (2.5), as its pipeline does.
    """

    embeds: torch.Tensor  # (captions, 77, width)
    pooled: torch.Tensor  # (captions, projection)
    time_ids: torch.Tensor  # (1, k) for kept captions
    dropped_time_ids: torch.Tensor  # (1, k) for the empty prompt

    def __call__(self, caption: torch.Tensor, dropped: torch.Tensor):
        caption = torch.where(dropped, torch.zeros_like(caption), caption)
        time_ids = torch.where(dropped[:, None], self.dropped_time_ids, self.time_ids)
        return self.embeds[caption], {"text_embeds": self.pooled[caption], "time_ids": time_ids}


@dataclass
class DenoiserData:
    latents: torch.Tensor  # (n, 4, h, w), already × scaling factor
    captions: torch.Tensor  # (n,) long: row of Conditioning
    conditioning: Conditioning
    decoys: torch.Tensor | None = None  # (n, 4, h, w): each scene's `shapes.decoy`, for DenoiserRun.decoy


@dataclass
class DenoiserRun:
    batch: int
    lr: float
    max_timestep: int = 1000  # the refiner trains only below 200, the low-noise end
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    seed: int = 0
    log_every: int = 100
    name: str = "unet"
    # What makes copies hold from any seed (datasets/README, "Copy fidelity"), here for the model itself: without
    # them the base reads the layout and colour of a scene off the seed's noise and can draw "on the left" on
    # the right ("The base read the layout off the seed"). The build gives them to the base only: the refiner
    # starts from the base's latents, never from a seed.
    pure_noise: float = 0.0  # share of samples trained from pure noise, as the sampler's first step sees it
    noise_offset: float = 0.0
    # The same mismatch, fixed the other way: a share of samples start at t ≥ 850 from the noised decoy (the
    # scene with its caption's named attributes redrawn) and are asked for the real image. The remnant then
    # says nothing about what the caption names, as a seed's does not, and stays true for what it leaves out,
    # which is where a seed's variety comes from. Dropped captions keep the real scene.
    decoy: float = 0.0


def noisy_batch(data: DenoiserData, run: DenoiserRun, sched, gen: torch.Generator):
    """(model input, timesteps, target (noise, or velocity), min-SNR weights, caption rows, dropped mask) for one
    random batch.

    Extra random numbers are drawn only for the options that are on, so a build without them is unchanged."""
    device = data.latents.device
    idx = torch.randint(len(data.latents), (run.batch,), generator=gen, device=device)
    x0 = data.latents[idx]
    t = torch.randint(0, run.max_timestep, (run.batch,), generator=gen, device=device)
    noise = draw_noise(x0.shape, gen, device, run.noise_offset)
    dropped = torch.rand(run.batch, generator=gen, device=device) < run.caption_dropout
    pure = torch.zeros_like(t, dtype=torch.bool)
    if run.pure_noise and run.max_timestep > PURE_NOISE_FROM:
        pure = torch.rand(run.batch, generator=gen, device=device) < run.pure_noise
        start = torch.randint(PURE_NOISE_FROM, run.max_timestep, t.shape, generator=gen, device=device)
        t = torch.where(pure, start, t)
    xt, target = from_pure_noise(sched, x0, noise, t, pure)
    if run.decoy and run.max_timestep > PURE_NOISE_FROM:
        decoyed = (torch.rand(run.batch, generator=gen, device=device) < run.decoy) & ~dropped
        start = torch.randint(PURE_NOISE_FROM, run.max_timestep, t.shape, generator=gen, device=device)
        t = torch.where(decoyed, start, t)
        xt, target = from_decoy(sched, x0, data.decoys[idx], noise, t, decoyed, xt, target)
    a = sched.alphas_cumprod.to(device)[t].view(-1, 1, 1, 1)
    snr = a / (1 - a)
    if sched.config.prediction_type == "v_prediction":
        # Velocity is x0 at the last step, whose SNR is 0 on a zero-terminal-SNR schedule: min-SNR's x0 weight
        # min(SNR, γ) would give the steps that decide a scene's layout and colour no weight at all, so weigh
        # x0 by min(SNR + 1, γ) instead (plain velocity MSE wherever SNR < γ − 1).
        target = sched.get_velocity(x0, target, t)
        weight = (snr + 1).clamp(max=MIN_SNR_GAMMA) / (snr + 1)
    else:
        weight = snr.clamp(max=MIN_SNR_GAMMA) / snr
    return xt, t, target, weight.flatten(), data.captions[idx], dropped


def from_decoy(sched, x0, decoys, noise, t, where, xt, target):
    """(model input, noise target): where `where` is set, `decoys` noised to t as the input and the noise that
    makes the model's x0 estimate the real `x0` as the target; elsewhere `xt` and `target` as they were."""
    noisy = sched.add_noise(decoys, noise, t)
    mask = where.view(-1, 1, 1, 1)
    return torch.where(mask, noisy, xt), torch.where(mask, implied_noise(sched, noisy, x0, t), target)


def train_denoiser(unet, data: DenoiserData, run: DenoiserRun, budget: Budget, schedule) -> tuple[int, float]:
    """Train `unet` in place on `schedule` (its pipeline's scheduler config) and leave the EMA weights in it;
    returns (steps, final mean loss)."""
    from diffusers import DDPMScheduler

    device = data.latents.device
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")
    sched = DDPMScheduler.from_config(schedule)  # the training view of the sampler's schedule (add_noise)
    gen = torch.Generator(device).manual_seed(run.seed)
    params = [p for p in unet.parameters()]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=run.lr, weight_decay=1e-2)
    unet.train().requires_grad_(True)
    step, running = 0, []
    while not budget.done(step):
        for group in opt.param_groups:
            group["lr"] = run.lr * budget.lr_factor(step)
        xt, t, target, weight, caption, dropped = noisy_batch(data, run, sched, gen)
        text, added = data.conditioning(caption, dropped)
        with autocast:
            pred = unet(xt, t, encoder_hidden_states=text, added_cond_kwargs=added).sample
        loss = (F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3)) * weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(run.ema_decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - decay)
        running.append(loss.detach())
        step += 1
        if step % run.log_every == 0:
            mean = torch.stack(running[-run.log_every :]).mean()
            log.info("%s step %d loss %.4f (%.1f s)", run.name, step, mean, budget.elapsed())
    with torch.no_grad():
        for p, e in zip(params, ema, strict=True):
            p.copy_(e)
    unet.eval().requires_grad_(False)
    return step, float(torch.stack(running[-50:]).mean()) if running else float("nan")
