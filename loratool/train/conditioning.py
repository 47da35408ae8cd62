"""What the UNet sees, computed once: the image's latent and the empty prompt's embeddings.

The copy machine trains on one image with one (empty) prompt, so neither the VAE encoder nor the two
text encoders are needed after the first second: encode once, then let them leave memory.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import torch

from loratool.data.images import TrainImage


@dataclass
class EncodedImage:
    """The training image as the UNet sees it: latent, empty-prompt embeddings, micro-conditioning."""

    latent: torch.Tensor  # (1, 4, h/8, w/8), already times the VAE's scaling factor
    prompt_embeds: torch.Tensor  # (1, 77, te1 + te2 width)
    pooled: torch.Tensor  # (1, te2 projection)
    time_ids: torch.Tensor  # (1, 6): original size, crop top-left, target size

    def unet_kwargs(self, dtype: torch.dtype | None = None) -> dict:
        cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
        return dict(
            encoder_hidden_states=cast(self.prompt_embeds),
            added_cond_kwargs={"text_embeds": cast(self.pooled), "time_ids": cast(self.time_ids)},
        )


@torch.no_grad()
def encode_once(pipe, image: TrainImage) -> EncodedImage:
    """Latent of the image (the distribution's mode: deterministic) and the empty prompt's embeddings."""
    device = pipe.unet.device
    latent = encode_latent(pipe.vae, image.pixels[None].to(device))
    embeds, _, pooled, _ = pipe.encode_prompt(prompt="", device=device, do_classifier_free_guidance=False)
    time_ids = torch.tensor([image.time_ids()], dtype=torch.float32, device=device)
    return EncodedImage(latent, embeds.float(), pooled.float(), time_ids)


@torch.no_grad()
def encode_latent(vae, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, h, w) in [-1, 1] → the latent distribution's mode (deterministic), times the scaling factor."""
    if vae.dtype != torch.float32:
        vae.to(torch.float32)  # SDXL's VAE overflows in fp16; it is small, so encode (and decode) in fp32
    latent = vae.encode(pixels.to(vae.device, torch.float32)).latent_dist.mode()
    return (latent * vae.config.scaling_factor).float()


def release_encoders(pipe, keep_decoder: bool, keep_text: bool = False):
    """Drop the text encoders (unless they train) and the VAE encoder; returns the VAE (decoder only) or None.

    The copy check decodes renders every --check-every steps. Keeping the decoder (about 50 M parameters,
    0.2 GB in fp32 for SDXL) is cheaper than re-reading a multi-GB checkpoint at every check.
    """
    vae = pipe.vae if keep_decoder else None
    if vae is not None:
        vae.encoder = None
        vae.quant_conv = None
    names = ("vae",) if keep_text else ("text_encoder", "text_encoder_2", "vae", "tokenizer", "tokenizer_2")
    for name in names:
        setattr(pipe, name, None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return vae
