""" "Has it become a copy?": render the empty prompt from fixed seeds and compare with the training image.

The renders use their own generators, so checking never changes the training's random stream
(a resumed run stays identical to an uninterrupted one, checks or not).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from loratool.metrics import psnr, ssim
from loratool.train.conditioning import EncodedImage

log = logging.getLogger(__name__)

THUMB = 256  # preview tiles are at most this many pixels a side: a 1024² run stays a small PNG


@dataclass
class CopyChecker:
    vae: object  # decoder-only AutoencoderKL
    scheduler_config: dict
    cond: EncodedImage
    reference: torch.Tensor  # (1, 3, h, w) in [0, 1]
    seeds: list[int]
    steps: int
    rows: list[tuple[int, list]] = field(default_factory=list)  # (step, PIL thumbnails) for the preview

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        sf = self.vae.config.scaling_factor
        image = self.vae.decode(latents.float() / sf).sample
        return ((image + 1) / 2).clamp(0, 1).cpu()

    @classmethod
    def of(cls, vae, scheduler_config: dict, cond: EncodedImage, pixels: torch.Tensor, seeds: int, steps: int):
        """A checker of `pixels` ((3, h, w) in [−1, 1], the training image) from seeds 0 … seeds − 1."""
        reference = ((pixels[None] + 1) / 2).clamp(0, 1)
        return cls(vae, dict(scheduler_config), cond, reference, list(range(seeds)), steps)

    @torch.no_grad()
    def denoise(self, unet, seed: int) -> torch.Tensor:
        """Euler sampling of the empty prompt, no guidance (the prompt is empty), at the training size."""
        from diffusers import EulerDiscreteScheduler

        sched = EulerDiscreteScheduler.from_config(self.scheduler_config)
        device = self.cond.latent.device
        sched.set_timesteps(self.steps, device=device)
        generator = torch.Generator("cpu").manual_seed(seed)
        latents = torch.randn(self.cond.latent.shape, generator=generator).to(device) * sched.init_noise_sigma
        kwargs = self.cond.unet_kwargs()
        for t in sched.timesteps:
            pred = unet(sched.scale_model_input(latents, t), t, **kwargs).sample
            latents = sched.step(pred.float(), t, latents).prev_sample
        return self.decode(latents)

    def vae_ceiling(self) -> float:
        """PSNR of decode(encode(image)): no LoRA can beat the VAE's own reconstruction."""
        return float(psnr(self.decode(self.cond.latent), self.reference).item())

    def check(self, unet, step: int) -> dict:
        start = time.perf_counter()
        was_training = unet.training
        unet.eval()
        try:
            renders = torch.cat([self.denoise(unet, seed) for seed in self.seeds])
        finally:
            unet.train(was_training)
        reference = self.reference.expand_as(renders)
        p, s = psnr(renders, reference).tolist(), ssim(renders, reference).tolist()
        self.rows.append((step, [_thumbnail(r) for r in renders]))
        result = dict(step=step, psnr=p, ssim=s, mean_psnr=sum(p) / len(p), min_psnr=min(p), mean_ssim=sum(s) / len(s))
        result["seconds"] = round(time.perf_counter() - start, 3)
        log.debug("check at step %d: PSNR %.2f dB, SSIM %.3f", step, result["mean_psnr"], result["mean_ssim"])
        return result

    def preview(self):
        """The training image beside the renders of every check, one row per check."""
        from PIL import Image, ImageDraw

        ref = _thumbnail(self.reference[0])
        w, h = ref.size
        sheet = Image.new("RGB", (w * (1 + len(self.seeds)), h * max(1, len(self.rows))), "white")
        for row, (step, tiles) in enumerate(self.rows):
            sheet.paste(ref, (0, row * h))
            for col, tile in enumerate(tiles, start=1):
                sheet.paste(tile, (col * w, row * h))
            ImageDraw.Draw(sheet).text((w + 2, row * h + 2), f"step {step}", fill="white")
        return sheet


def _thumbnail(image: torch.Tensor):
    from PIL import Image

    array = (image.permute(1, 2, 0).float().numpy() * 255).round().astype("uint8")
    tile = Image.fromarray(array)
    tile.thumbnail((THUMB, THUMB))
    return tile
