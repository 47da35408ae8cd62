"""The two SDXL text encoders during training: caption encoding and their LoRAs (--train-text-encoder)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass
class TextEncoders:
    """Tokenizers and encoders (LoRA-wrapped when trained); `encoders` may be swapped for DDP wrappers."""

    tokenizers: tuple
    encoders: tuple
    device: torch.device

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL's conditioning, as diffusers' encode_prompt builds it: the penultimate hidden states of both
        encoders side by side, and the second encoder's pooled projection."""
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.encoders, strict=True):
            ids = tokenizer(
                captions,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            out = encoder(ids, output_hidden_states=True)
            if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1).float(), pooled.float()

    @torch.no_grad()
    def encode_frozen(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(captions)


def text_encoders(pipe) -> TextEncoders:
    return TextEncoders((pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2), pipe.unet.device)


def inject_text_lora(encoder, rank: int, alpha: float, adapter: str) -> None:
    """peft LoRA on the attention projections (kohya's lora_te targets); factors train in fp32."""
    from peft import LoraConfig, inject_adapter_in_model

    from loratool.lora.targets import text_targets

    encoder.requires_grad_(False)
    # suffix paths match encoders with and without transformers' `text_model.` level
    targets = [t.removeprefix("text_model.") for t in text_targets(encoder)]
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian")
    inject_adapter_in_model(config, encoder, adapter_name=adapter)
    for p in encoder.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    encoder.train()
    log.debug("LoRA rank %d on %d text-encoder modules", rank, len(targets))
