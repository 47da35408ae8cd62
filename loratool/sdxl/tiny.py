"""Tiny SDXL-architecture models built from configs, offline.

Same diffusers/transformers classes and key layout as real SDXL (text_time conditioning, two text
encoders of different widths, a x8 VAE, SDXL's Euler scheduler, a refiner with aesthetic-score
conditioning), only narrow. Tests build them; the demo model starts from the same configs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# Words that get a single token each in the tiny tokenizer, so short captions stay short.
DEFAULT_WORDS = (
    "a photo of the an on in with and small large big tiny red green blue yellow white black orange "
    "purple circle square triangle background left right center middle wrong blurry"
).split()


@dataclass(frozen=True)
class TinySpec:
    """Widths of a tiny SDXL; the defaults give a ~1 M-parameter base that renders 64 px in a blink."""

    unet_channels: tuple[int, ...] = (16, 32, 64)
    transformer_depth: tuple[int, ...] = (1, 1, 2)
    heads: tuple[int, ...] = (1, 2, 4)
    refiner_channels: tuple[int, ...] = (16, 32, 48, 48)
    vae_channels: tuple[int, ...] = (8, 16, 16, 16)
    norm_groups: int = 8
    vae_norm_groups: int = 4
    te1_width: int = 32
    te2_width: int = 48
    te2_projection: int = 40
    time_embed_dim: int = 8
    sample_size: int = 64
    words: tuple[str, ...] = field(default=tuple(DEFAULT_WORDS))


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte → printable-character table (the GPT-2 scheme)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def build_tokenizer(words: tuple[str, ...] = tuple(DEFAULT_WORDS), pad_token: str = "<|endoftext|>"):
    """A real CLIP BPE tokenizer with a byte-level base vocabulary plus whole-word merges.

    Passed as vocab=/merges= objects: in transformers 5 `vocab_file=` silently builds a 3-token tokenizer.
    """
    from transformers import CLIPTokenizer

    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        # Start from what the merges so far make of the word ("green" meets "red"'s ("r", "e") first), then
        # join those pieces left to right; later rules never preempt earlier words' rules, so they stay whole.
        pieces = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        merged = pieces[0]
        for piece in pieces[1:]:
            rule = (merged, piece)
            merged += piece
            if rule not in ranks:
                ranks[rule] = len(ranks)
                tokens.append(merged)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=list(ranks), pad_token=pad_token, model_max_length=77)


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's byte-pair encoding of one word: merge the lowest-ranked adjacent pair until none is ranked."""
    while len(pieces) > 1:
        pairs = zip(pieces[:-1], pieces[1:], strict=True)
        rank, i = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(pairs))
        if rank == len(ranks):
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2 :]
    return pieces


def _text_encoder_config(width: int, projection: int, act: str, vocab_size: int, eos_id: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=width * 2,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=projection,
        bos_token_id=eos_id - 1,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def unet_config(spec: TinySpec) -> dict:
    """The base UNet config: SDXL's block layout and text_time conditioning, narrow."""
    return dict(
        sample_size=spec.sample_size // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=spec.unet_channels,
        layers_per_block=2,
        transformer_layers_per_block=spec.transformer_depth,
        attention_head_dim=spec.heads,
        cross_attention_dim=spec.te1_width + spec.te2_width,
        norm_num_groups=spec.norm_groups,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=spec.time_embed_dim,
        projection_class_embeddings_input_dim=spec.time_embed_dim * 6 + spec.te2_projection,
    )


def refiner_unet_config(spec: TinySpec) -> dict:
    """The refiner UNet: four blocks, second text encoder only, 5 time ids (aesthetic score)."""
    return dict(
        sample_size=spec.sample_size // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=spec.refiner_channels,
        layers_per_block=2,
        transformer_layers_per_block=1,
        attention_head_dim=tuple(c // 16 for c in spec.refiner_channels),
        cross_attention_dim=spec.te2_width,
        norm_num_groups=spec.norm_groups,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=spec.time_embed_dim,
        projection_class_embeddings_input_dim=spec.time_embed_dim * 5 + spec.te2_projection,
    )


def vae_config(spec: TinySpec) -> dict:
    n = len(spec.vae_channels)
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=spec.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=spec.vae_norm_groups,
        sample_size=spec.sample_size,
        scaling_factor=0.13025,  # SDXL's
        force_upcast=True,
    )


def scheduler():
    """SDXL's scheduler settings (scheduler_config.json of the base model)."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
    )


def build_tiny_pipelines(spec: TinySpec = TinySpec(), seed: int = 0):
    """Random-init tiny base and refiner pipelines; the refiner shares text_encoder_2 and the VAE."""
    import torch
    from diffusers import (
        AutoencoderKL,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok1 = build_tokenizer(spec.words)
    tok2 = build_tokenizer(spec.words, pad_token="!")  # SDXL's second tokenizer pads with "!"
    eos = tok1.convert_tokens_to_ids("<|endoftext|>")
    te1 = CLIPTextModel(_text_encoder_config(spec.te1_width, spec.te1_width, "quick_gelu", len(tok1), eos))
    te2 = CLIPTextModelWithProjection(_text_encoder_config(spec.te2_width, spec.te2_projection, "gelu", len(tok2), eos))
    vae = AutoencoderKL(**vae_config(spec))
    base = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=tok1,
        tokenizer_2=tok2,
        unet=UNet2DConditionModel(**unet_config(spec)),
        scheduler=scheduler(),
    )
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=vae,
        text_encoder=None,
        text_encoder_2=te2,
        tokenizer=None,
        tokenizer_2=tok2,
        unet=UNet2DConditionModel(**refiner_unet_config(spec)),
        scheduler=scheduler(),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
    return base, refiner


def save_tiny(root: Path, spec: TinySpec = TinySpec(), seed: int = 0) -> tuple[Path, Path]:
    """Write `root/base` and `root/refiner` as diffusers folders; returns both paths."""
    base, refiner = build_tiny_pipelines(spec, seed)
    base_dir, refiner_dir = Path(root) / "base", Path(root) / "refiner"
    base.save_pretrained(base_dir)
    refiner.save_pretrained(refiner_dir)
    return base_dir, refiner_dir
