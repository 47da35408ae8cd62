"""Moving LoRAs between our representation and live models: peft adapters and folded weights."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from loratool.lora.network import LoraModule, LoraNetwork


def model_path(model, component: str, path: str) -> str:
    """Our canonical path → the model's own module path.

    transformers >= 5.6 flattens CLIPTextModel (no `text_model.` level); files keep the classic paths.
    """
    if component != "unet" and not hasattr(model, "text_model"):
        return path.removeprefix("text_model.")
    return path


def canonical_path(model, component: str, name: str) -> str:
    name = name.removeprefix("base_model.model.")
    if component != "unet" and not name.startswith("text_model."):
        return "text_model." + name
    return name


def peft_config(modules: list[LoraModule], model=None, component: str = "unet"):
    """A peft LoraConfig covering exactly `modules`, with per-module ranks/alphas where they differ."""
    from peft import LoraConfig

    rank = Counter(m.rank for m in modules).most_common(1)[0][0]
    alpha = Counter(float(m.alpha) for m in modules).most_common(1)[0][0]
    # Suffix paths (no `text_model.`) match text encoders with and without the wrapper level.
    names = {m.path: m.path.removeprefix("text_model.") for m in modules}
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=sorted(names.values()),
        rank_pattern={names[m.path]: m.rank for m in modules if m.rank != rank},
        alpha_pattern={names[m.path]: float(m.alpha) for m in modules if float(m.alpha) != alpha},
        init_lora_weights=False,
    )


def add_adapter(model, network: LoraNetwork, component: str, adapter: str) -> None:
    """Inject `network`'s modules of `component` into `model` as peft adapter `adapter`, weights copied exactly."""
    import torch
    from peft import inject_adapter_in_model

    modules = [m for m in network if m.component == component]
    if not modules:
        return
    with warnings.catch_warnings():  # peft warns on every adapter after the first; several are what callers want
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(peft_config(modules), model, adapter_name=adapter)
    with torch.no_grad():
        for m in modules:
            layer = model.get_submodule(model_path(model, component, m.path))
            layer.lora_A[adapter].weight.copy_(m.down)
            layer.lora_B[adapter].weight.copy_(m.up)


def set_scale(model, adapter: str, scale: float) -> None:
    """Every peft LoRA layer of `adapter` in `model` at `scale` × its alpha / rank (peft's own `set_scale`)."""
    from peft.tuners.lora import LoraLayer

    for layer in model.modules():
        if isinstance(layer, LoraLayer):
            layer.set_scale(adapter, scale)


@contextmanager
def scaled(model, adapter: str, scale: float) -> Iterator[None]:
    """`adapter` at `scale` inside the block, back at 1 after (slider mode: +1 for image A, −1 for image B)."""
    if scale == 1.0:  # every other mode: nothing to switch
        yield
        return
    set_scale(model, adapter, scale)
    try:
        yield
    finally:
        set_scale(model, adapter, 1.0)


@contextmanager
def adapters_off(model) -> Iterator[None]:
    """Every peft adapter of `model` off inside the block (the base model's own prediction), on again after.

    Walks the modules itself rather than calling diffusers' `unet.disable_adapters()`: training passes the
    accelerate-wrapped UNet (DDP across processes), which has no such method but the same modules."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def network_from_peft(model, component: str, adapter: str) -> LoraNetwork:
    """Read a peft adapter's factors and alphas out of a live model (a copy, on CPU, float32)."""
    network = LoraNetwork()
    for name, layer in model.named_modules():
        lora_a = getattr(layer, "lora_A", None)
        if lora_a is None or adapter not in lora_a:
            continue
        network.add(
            LoraModule(
                component=component,
                path=canonical_path(model, component, name),
                down=lora_a[adapter].weight.detach().float().cpu().clone(),
                up=layer.lora_B[adapter].weight.detach().float().cpu().clone(),
                alpha=float(layer.lora_alpha[adapter]),
            )
        )
    return network


def fold_network(model, network: LoraNetwork, component: str, weight: float = 1.0) -> int:
    """W += weight · ΔW for every module of `component`, computed in float32; returns how many were folded."""
    import torch

    count = 0
    with torch.no_grad():
        for m in network:
            if m.component != component:
                continue
            layer = model.get_submodule(model_path(model, component, m.path))
            target = getattr(layer, "base_layer", layer).weight
            delta = m.delta().to(target.device) * weight
            target.copy_((target.float() + delta).to(target.dtype))
            count += 1
    return count


def layer_shapes(model, component: str) -> dict[tuple[str, str], tuple[int, ...]]:
    """(component, canonical path) → weight shape of every Linear/Conv2d, for validating LoRAs."""
    import torch

    shapes = {}
    for name, layer in model.named_modules():
        if isinstance(layer, torch.nn.Linear | torch.nn.Conv2d) and "lora_" not in name:
            name = name.removesuffix(".base_layer")
            shapes[(component, canonical_path(model, component, name))] = tuple(layer.weight.shape)
    return shapes
