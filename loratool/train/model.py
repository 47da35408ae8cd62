"""What the loop trains: the UNet with a peft LoRA injected, plus everything computed once before the loop.

Every mode (copy_machine, dreambooth) builds a Trainee from its own data with the helpers here; the loop
reads Trainees and knows no mode.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loratool.data.images import TrainImage
from loratool.errors import ModelSourceError
from loratool.lora.apply import fold_network
from loratool.lora.network import COMPONENT_MODELS
from loratool.sdxl.index import ModelIndex, read
from loratool.train.batch import BucketSource, OneBatch, PairBatches, RenderBatches
from loratool.train.check import CopyChecker
from loratool.train.config import TrainConfig
from loratool.train.text import TextEncoders

log = logging.getLogger(__name__)

ADAPTER = "copy"  # not "A"/"B": peft matches adapter names inside keys, and those clash with lora_A/lora_B


@dataclass
class Trainee:
    unet: object
    noise_scheduler: object  # DDPM: add_noise / get_velocity with the model's training schedule
    source: OneBatch | PairBatches | BucketSource | RenderBatches  # the batches of each step
    keymap: object  # built before peft wraps the modules
    device: torch.device
    data_sha256: str  # what was trained on: the image (copy) or the whole dataset (dreambooth)
    checker: CopyChecker | None = None  # or slider mode's pair of them (train.slider)
    image: TrainImage | None = None  # copy mode
    text: TextEncoders | None = None  # set when the text encoders train (their LoRAs are re-run every step)
    dataset: dict = field(default_factory=dict)  # dreambooth: prompts and counts, for metadata and report
    base_loras: list[dict] = field(default_factory=list)
    vae_psnr: float | None = None

    def trained_modules(self) -> dict[str, torch.nn.Module]:
        """Every model that carries a LoRA, by component name (unet, te1, te2)."""
        modules = {"unet": self.unet}
        if self.text is not None:
            modules |= dict(zip(("te1", "te2"), self.text.encoders, strict=True))
        return modules


def weights_runtime(config: TrainConfig):
    """Frozen weights in the mixed-precision dtype on CUDA (half the memory); fp32 on CPU, where autocast does it."""
    from loratool.sdxl.models import Runtime, pick_runtime

    runtime = pick_runtime(config.device, "fp32")
    if runtime.device.startswith("cuda") and config.mixed_precision != "no":
        return Runtime(runtime.device, config.mixed_precision)
    return runtime


def load_base(config: TrainConfig):
    """The base pipeline (its UNet quantized on request); settles --resolution at the model's native size."""
    from loratool.sdxl.models import load_pipeline

    runtime = weights_runtime(config)
    parts = {"unet": load_quantized_unet(config, runtime)} if config.quantize_base else {}
    pipe = load_pipeline(config.model, runtime, config=config.model_config, **parts)
    settle_resolution(config, pipe)
    return pipe


def settle_resolution(config: TrainConfig, pipe) -> None:
    """--resolution, when not given: the UNet's sample_size × the VAE's 8, the size `sample` renders at."""
    if config.resolution is None:
        native = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
        config.resolution = max(64, native // 64 * 64)
        log.info("resolution: %d (the model's native size)", config.resolution)


def fold_base_loras(pipe, config: TrainConfig, index: ModelIndex) -> list[dict]:
    """Recipe 1 (merge-then-train): add each --base-lora into the weights before anything is encoded."""
    loras = [read(spec, index) for spec in config.base_lora_weights()]  # all checked before the first fold
    models = {c: getattr(pipe, a) for c, a in COMPONENT_MODELS.items()}
    for lora in loras:
        for component in lora.network.components():
            fold_network(models[component], lora.network, component, lora.weight)
        log.info("folded %s at weight %g into the base", lora.path, lora.weight)
    return [{"file": lora.path.name, "weight": lora.weight, "sha256": lora.sha256} for lora in loras]


def inject_lora(unet, config: TrainConfig) -> None:
    from peft import LoraConfig

    from loratool.lora.targets import in_blocks, is_conv3x3, unet_targets

    unet.requires_grad_(False)
    targets = [t for t in unet_targets(unet, conv=config.conv_rank > 0) if in_blocks(t, config.blocks)]
    # LoCon: the 3×3 convs get --conv-rank/--conv-alpha (peft matches each full path as a pattern)
    convs = [name for name in targets if is_conv3x3(unet.get_submodule(name))]
    conv_alpha = config.conv_alpha or float(config.conv_rank)
    torch.manual_seed(config.seed)  # peft's gaussian init draws from the global generator
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        target_modules=targets,
        rank_pattern=dict.fromkeys(convs, config.conv_rank),
        alpha_pattern=dict.fromkeys(convs, conv_alpha),
        init_lora_weights="gaussian",
    )
    unet.add_adapter(lora, adapter_name=ADAPTER)
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # LoRA factors train in fp32 even when the frozen base is fp16/bf16
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    log.debug(
        "LoRA rank %d on %d UNet modules (%d 3×3 convs at rank %d)",
        config.rank,
        len(targets),
        len(convs),
        config.conv_rank,
    )


def load_quantized_unet(config: TrainConfig, runtime):
    """QLoRA-style: the frozen UNet in 4-bit NF4 or 8-bit through bitsandbytes (CUDA only, checked earlier)."""
    from diffusers import BitsAndBytesConfig, UNet2DConditionModel

    if config.quantize_base == "nf4":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=runtime.dtype)
    else:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    kwargs = dict(quantization_config=quant, dtype=runtime.dtype)
    path = Path(config.model).expanduser()
    try:
        if path.is_file():
            config_source = config.model_config
            return UNet2DConditionModel.from_single_file(str(path), config=config_source, subfolder="unet", **kwargs)
        return UNet2DConditionModel.from_pretrained(config.model, subfolder="unet", **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"could not load a quantized UNet from {config.model!r}: {exc}") from exc
