"""Training the demo's x8 VAE and normalising its latents to SDXL's scaling factor."""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from loratool.demo.schedule import Budget

log = logging.getLogger(__name__)

KL_WEIGHT = 1e-7  # only keeps the posterior well-defined; the scale is fixed afterwards by `normalise_latents`
FOREGROUND_WEIGHT = 4.0  # extra weight of shape pixels in the reconstruction loss
EDGE_WEIGHT = 0.5  # L1 on image gradients: keeps shape edges sharp without a perceptual network


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (n, 3, h, w) → float in [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


def _edges(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def foreground_weight(x: torch.Tensor) -> torch.Tensor:
    """1 on the background (the corner colour: shapes never reach the corners), 1 + FOREGROUND_WEIGHT on shapes.

    Shapes cover ~5-25 % of a scene; unweighted, the VAE learns their outline long before their colour.
    """
    off = (x - x[..., :1, :1]).abs().amax(dim=1, keepdim=True) > 0.1
    return 1.0 + FOREGROUND_WEIGHT * off.float()


def reconstruction_loss(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    rec = rec.float()
    error = rec - x
    loss = (foreground_weight(x) * (error.abs() + error.pow(2))).mean()
    for r, t in zip(_edges(rec), _edges(x), strict=True):
        loss = loss + EDGE_WEIGHT * F.l1_loss(r, t)
    return loss


def vae_loss(vae, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    posterior = vae.encode(x).latent_dist
    rec = vae.decode(posterior.sample(generator=generator)).sample
    return reconstruction_loss(rec, x) + KL_WEIGHT * posterior.kl().float().mean()


def decoder_loss(vae, posterior: torch.Tensor, x: torch.Tensor, crop: int, generator: torch.Generator) -> torch.Tensor:
    """Reconstruction from a sample of the frozen encoder's posterior (`posterior`: its mean and std stacked).

    Sampled, not the mode, because that is the objective the whole VAE was trained on: a decoder fitted to the
    modes alone would meet latents a little off them (what a UNet draws) unprepared.
    `crop` > 0 decodes a random window of the latents (crop // 8 cells) against the same window of the image:
    the latents stay those of the whole scene, as the UNets see them.
    """
    mean, std = posterior.unbind(1)
    z = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device)
    if crop:
        cells = crop // 8
        top, left = (int(v) for v in torch.randint(z.shape[-1] - cells + 1, (2,), generator=generator, device=z.device))
        z = z[..., top : top + cells, left : left + cells]
        x = x[..., 8 * top : 8 * (top + cells), 8 * left : 8 * (left + cells)]
    return reconstruction_loss(vae.decode(z).sample, x)


def train_vae(
    vae,
    images: torch.Tensor,
    *,
    batch: int,
    lr: float,
    budget: Budget,
    seed: int,
    log_every: int,
    crop: int = 0,
    decoder_only: bool = False,
):
    """Fit `vae` to uint8 `images` (on the training device); returns (steps, final mean loss).

    `crop` > 0 trains on random crops of that size (one offset per batch): the VAE is convolutional, and a
    64 px crop costs a quarter of a 128 px image, which is what makes a CPU fine-tune affordable.
    `decoder_only` keeps the encoder (and so every latent a UNet was trained on) and fits the decoder to it:
    a change to how scenes are drawn that needs no UNet retrained (datasets/README says what it did).
    """
    device = images.device
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")
    gen = torch.Generator(device).manual_seed(seed)
    vae.train().requires_grad_(not decoder_only)
    trained = [vae.decoder, vae.post_quant_conv] if decoder_only else [vae]
    params = [p for module in trained for p in module.requires_grad_(True).parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    posteriors = _posteriors(vae, images) if decoder_only else None
    step, running = 0, []
    while not budget.done(step):
        for group in opt.param_groups:
            group["lr"] = lr * budget.lr_factor(step)
        idx = torch.randint(len(images), (batch,), generator=gen, device=device)
        with autocast:
            if decoder_only:
                loss = decoder_loss(vae, posteriors[idx], to_float(images[idx]), crop, gen)
            else:
                loss = vae_loss(vae, to_float(_crop(images[idx], crop, gen)), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running.append(loss.detach())
        step += 1
        if step % log_every == 0:
            log.info("vae step %d loss %.4f (%.1f s)", step, torch.stack(running[-log_every:]).mean(), budget.elapsed())
    vae.eval().requires_grad_(False)
    return step, float(torch.stack(running[-50:]).mean()) if running else float("nan")


def _crop(x: torch.Tensor, crop: int, generator: torch.Generator) -> torch.Tensor:
    if not crop:
        return x
    top, left = (int(v) for v in torch.randint(x.shape[-1] - crop + 1, (2,), generator=generator, device=x.device))
    return x[..., top : top + crop, left : left + crop]


@torch.no_grad()
def _posteriors(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """(n, 2, c, h, w): each image's posterior mean and std, computed once since the encoder is frozen."""
    out = []
    for i in range(0, len(images), batch):
        dist = vae.encode(to_float(images[i : i + batch])).latent_dist
        out.append(torch.stack([dist.mean, dist.std], dim=1).float())
    return torch.cat(out)


@torch.no_grad()
def encode(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Deterministic latents (posterior mode) times the VAE's scaling factor, in fp32."""
    out = [vae.encode(to_float(images[i : i + batch])).latent_dist.mode() for i in range(0, len(images), batch)]
    return torch.cat(out).float() * vae.config.scaling_factor


@torch.no_grad()
def normalise_latents(vae, images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Fold an affine map into quant_conv / post_quant_conv so scaled latents have mean 0 and std 1 per channel.

    SDXL's noise schedule assumes latents × 0.13025 of about unit variance; a VAE trained from scratch lands
    anywhere. Decoding is unchanged (up to rounding). Returns the channel means and stds found before the fold.
    """
    z = encode(vae, images) / vae.config.scaling_factor
    mean, std = z.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3)).clamp_min(1e-6)
    gain = 1.0 / (vae.config.scaling_factor * std)  # z' = (z - mean) * gain
    c = len(mean)
    q, p = vae.quant_conv, vae.post_quant_conv
    q.weight[:c] *= gain.view(-1, 1, 1, 1)
    q.bias[:c] = (q.bias[:c] - mean) * gain
    q.bias[c:] += 2.0 * torch.log(gain)  # log-variance follows the mean's scale
    p.bias += p.weight[:, :, 0, 0] @ mean  # z = z' / gain + mean
    p.weight /= gain.view(1, -1, 1, 1)
    return mean.tolist(), std.tolist()


@torch.no_grad()
def round_trip(vae, x: torch.Tensor) -> torch.Tensor:
    """decode(encode(x)) through the posterior mode, in [-1, 1]: what any model on this VAE can draw of x."""
    return vae.decode(vae.encode(x).latent_dist.mode()).sample.float().clamp(-1, 1)


@torch.no_grad()
def psnr(vae, images: torch.Tensor, batch: int = 128) -> float:
    """Reconstruction PSNR (dB) through the posterior mode, on the [0, 1] pixel scale."""
    errors = []
    for i in range(0, len(images), batch):
        x = to_float(images[i : i + batch])
        rec = round_trip(vae, x)
        errors.append(((rec - x) / 2).pow(2).mean(dim=(1, 2, 3)))
    mse = torch.cat(errors).mean().item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))
