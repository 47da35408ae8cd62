"""The diffusion loss of one batch, per sample, and how instance and prior-preservation terms combine."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from loratool.lora.apply import adapters_off
from loratool.train.batch import Batch, Guide

Encoder = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]  # captions → (prompt_embeds, pooled)
# SDXL samplers ("leading" spacing) take their first step at t ≈ 860–980 for 8–50 steps, from pure noise.
PURE_NOISE_FROM = 850


def sample_losses(
    unet,
    sched,
    batch: Batch,
    generator: torch.Generator,
    shard: tuple[int, int] = (0, 1),
    encode: Encoder | None = None,
    noise_offset: float = 0.0,
    min_snr_gamma: float | None = None,
    timestep: int | None = None,
    pure_noise: float = 0.0,
    multires_noise: float = 0.0,
) -> torch.Tensor:
    """MSE between the UNet's prediction and its target (noise, or velocity), one value per sample of our shard.

    Noise and timesteps are drawn for the whole global batch, then sharded: every process draws the same
    numbers, so N processes train exactly what one process would. A fixed `timestep` is for evaluation.
    `pure_noise` is the fraction of samples trained the way the sampler starts (see `from_pure_noise`).
    """
    latents = batch.latents
    noise = draw_noise(latents.shape, generator, latents.device, noise_offset, multires_noise)
    if timestep is None:
        n = sched.config.num_train_timesteps
        t = torch.randint(0, n, (latents.shape[0],), generator=generator, device=latents.device)
    else:
        t = torch.full((latents.shape[0],), timestep, device=latents.device)
    pure = torch.zeros_like(t, dtype=torch.bool)
    if pure_noise and timestep is None:
        pure = torch.rand(t.shape, generator=generator, device=t.device) < pure_noise
        start = torch.randint(PURE_NOISE_FROM, n, t.shape, generator=generator, device=t.device)
        t = torch.where(pure, start, t)
    index, count = shard
    batch, noise, t, pure = batch.shard(index, count), noise[index::count], t[index::count], pure[index::count]
    embeds, pooled = (batch.prompt_embeds, batch.pooled) if encode is None else encode(batch.captions)
    noisy, noise = from_pure_noise(sched, batch.latents, noise, t, pure)
    cond = {"text_embeds": pooled, "time_ids": batch.time_ids}
    pred = unet(noisy, t, encoder_hidden_states=embeds, added_cond_kwargs=cond).sample
    if batch.guide is not None:
        target = text_slider_target(unet, noisy, t, embeds, cond, batch.guide, batch.lora_scale)
    elif sched.config.prediction_type == "epsilon":
        target = noise
    else:
        target = sched.get_velocity(batch.latents, noise, t)
    losses = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma:
        losses = losses * min_snr_weight(sched, t, min_snr_gamma)
    return losses


def guided_target(base: torch.Tensor, plus: torch.Tensor, minus: torch.Tensor, scale: float, strength: float):
    """Concept Sliders' target (Gandikota et al. 2023): the base estimate moved scale × strength along the text
    direction plus − minus. Linear in the scale, so ±s are mirror images around the base and 0 is the base."""
    return base + (scale * strength) * (plus - minus)


@torch.no_grad()
def text_slider_target(unet, noisy, t, embeds, cond: dict, guide: Guide, scale: float) -> torch.Tensor:
    """The base model's (LoRA off) estimates in the batch's prompt and in the guide's two prompts, combined by
    `guided_target`. Whatever the model predicts (noise or velocity), the same.

    A step's batches (each context prompt at +1 and at −1) share noise and timestep, and LoRA-off estimates do not
    depend on the scale: the guide's pair is made once per step and the prompt's once per context, 4 UNet
    batches of the step's rows instead of 12 (2 contexts × 2 signs × 3 prompts)."""
    n, dtype = noisy.shape[0], embeds.dtype
    texts = {"prompt": (embeds, cond["text_embeds"].to(dtype))}
    texts |= {name: (e.expand(n, -1, -1).to(dtype), p.expand(n, -1).to(dtype)) for name, (e, p) in (
        ("plus", guide.plus), ("minus", guide.minus))}  # fmt: skip
    made = _frozen_estimates(unet, guide.estimates, noisy, t, cond["time_ids"], texts)
    return guided_target(made["prompt"], made["plus"], made["minus"], scale, guide.strength)


def _frozen_estimates(unet, memo: dict, noisy, t, time_ids, texts: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """{name: the LoRA-off estimate at `noisy`, `t` with that (embeds, pooled)}: kept from `memo` where the last
    estimate of that name had exactly these inputs (so reuse changes no bit), the others made in one UNet call."""
    made, missing = {}, []
    for name, text in texts.items():
        inputs, seen = (noisy, t, time_ids, *text), memo.get(name)
        if seen is not None and _same(seen[0], inputs):
            made[name] = seen[1]
        else:
            missing.append(name)
    if missing:
        k = len(missing)
        added = {"text_embeds": torch.cat([texts[m][1] for m in missing]), "time_ids": time_ids.repeat(k, 1)}
        hidden = torch.cat([texts[m][0] for m in missing])
        with adapters_off(unet):
            out = unet(noisy.repeat(k, 1, 1, 1), t.repeat(k), encoder_hidden_states=hidden, added_cond_kwargs=added)
        for name, estimate in zip(missing, out.sample.chunk(k), strict=True):
            # copies of the inputs: a caller may reuse its tensors in place
            memo[name] = (tuple(x.clone() for x in (noisy, t, time_ids, *texts[name])), estimate)
            made[name] = estimate
    return made


def _same(kept: tuple, inputs: tuple) -> bool:
    return all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(kept, inputs, strict=True))


def draw_noise(shape, generator: torch.Generator, device, offset: float = 0.0, multires: float = 0.0) -> torch.Tensor:
    """Unit Gaussian noise, plus `offset` × a random shift of each sample's channel means (offset noise): the
    model learns that a shifted mean is noise to remove, not colour to keep, so very dark or bright images can
    be drawn and a seed's mean colour is not copied. `multires` > 0 adds the same lesson for coarse layout
    (kohya's multires noise): noise drawn at 1/2, 1/4, … of the latent size, upsampled and weighted multires,
    multires², …, the sum scaled back to unit standard deviation. Each is drawn only when asked, so runs
    without them keep their random stream."""
    noise = torch.randn(shape, generator=generator, device=device)
    if offset:
        noise = noise + offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator, device=device)
    if not multires:
        return noise
    height, width = shape[-2:]
    level = 1
    while min(height, width) >> (level - 1) > 1:  # down to 1×1 on the shorter side
        coarse = (max(1, height >> level), max(1, width >> level))
        low = torch.randn((*shape[:2], *coarse), generator=generator, device=device)
        noise = noise + multires**level * F.interpolate(low, size=(height, width), mode="bilinear")
        level += 1
    return noise / noise.std()


def from_pure_noise(sched, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, pure: torch.Tensor):
    """(model input, noise the target is made of): the usual noising, except where `pure` is set.

    SDXL's schedule ends at a non-zero SNR: at t=999 the training input still holds 7 % of the image, but the
    sampler starts from noise that holds none. A copy LoRA then learns to read the image's colours off that
    remnant and, at sampling, reads them off the seed's noise instead. Pure samples show the model exactly
    what the sampler gives it (unit noise) and ask for the noise that makes its x0 estimate the image.
    """
    noisy = sched.add_noise(latents, noise, t)
    if not pure.any():
        return noisy, noise
    where = pure.view(-1, 1, 1, 1)
    return torch.where(where, noise, noisy), torch.where(where, implied_noise(sched, noise, latents, t), noise)


def implied_noise(sched, model_input: torch.Tensor, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The noise target that makes the model's x0 estimate from `model_input` at `t` exactly `latents`, whatever
    the input holds (pure noise, or another image noised): (input − √ᾱ·x0) / √(1 − ᾱ)."""
    ab = sched.alphas_cumprod.to(t.device)[t].to(latents.dtype).view(-1, 1, 1, 1)
    return (model_input - ab.sqrt() * latents) / (1 - ab).sqrt()


def min_snr_weight(sched, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ (Hang et al. 2023): stop the easy, low-noise timesteps from dominating the loss (per sample).
    ε-prediction weighs min(SNR, γ) / SNR, written as min(γ / SNR, 1): a zero-terminal-SNR schedule reaches SNR
    0 at its last step, where the quotient form is 0 / 0 and would make the whole loss NaN."""
    ac = sched.alphas_cumprod.to(t.device)[t].float()
    snr = ac / (1 - ac)
    if sched.config.prediction_type == "v_prediction":
        return torch.clamp(snr, max=gamma) / (snr + 1)
    return torch.clamp(gamma / snr, max=1.0)


def batch_weights(batches: list[Batch], prior_loss_weight: float = 1.0) -> list[float]:
    """Each batch's weight in a step's loss Σ weight · mean MSE: the instance batches share 1, the prior
    (class-image) batches share prior_loss_weight. That is dreambooth's mean instance MSE + prior_loss_weight ·
    mean prior MSE (the weight means the same at any batch size), and slider mode's mean of its two halves; as
    weights, so each batch can backpropagate on its own (slider mode's halves run the LoRA at opposite signs)."""
    counts = {prior: sum(b.prior == prior for b in batches) for prior in (False, True)}
    return [(prior_loss_weight if b.prior else 1.0) / counts[b.prior] for b in batches]
