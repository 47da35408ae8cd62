"""Resumable training state in `<name>.ckpt/step-NNNNNN/`: LoRA weights, optimizer, RNG, step and curves.

Everything that decides the next step is saved, so `--resume` reaches the same weights as a run
that was never stopped. Only the latest checkpoint is kept; each is written atomically.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from loratool.errors import InputError
from loratool.files import atomic_path

log = logging.getLogger(__name__)

# Settings that change the trajectory: resuming with different values would silently train something else.
# Dreambooth-only keys are absent (None == None) in copy mode; data_sha256 covers the image(s) themselves.
MUST_MATCH = (
    *("rank", "alpha", "lr", "seed", "resolution", "optimizer", "gradient_accumulation", "noise_offset"),
    *("pure_noise", "base_loras", "mode", "prompt", "class_prompt", "num_class_images", "prior_loss_weight"),
    *("batch_size", "train_text_encoder", "conv_rank", "conv_alpha", "data_sha256"),
)


@dataclass
class TrainState:
    step: int = 0
    losses: list[float] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)
    eval_loss_start: float | None = None


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The LoRA parameters by name (name-keyed, so a changed model fails loudly instead of loading wrongly).

    `model` is the UNet or a ModuleDict of every model that carries a LoRA (unet, te1, te2).
    """
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save(folder: Path, state: TrainState, model, optimizer, generator, settings: dict) -> Path:
    from safetensors.torch import save_file

    target = Path(folder) / f"step-{state.step:06d}"
    with atomic_path(target) as tmp:
        tmp.mkdir(parents=True)
        save_file(trainable_state(model), tmp / "lora.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save({"generator": generator.get_state()}, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(asdict(state) | {"settings": settings}))
    for old in Path(folder).glob("step-*"):
        if old != target:
            shutil.rmtree(old, ignore_errors=True)
    log.debug("checkpoint %s", target)
    return target


def latest(folder: Path) -> Path | None:
    found = sorted(p for p in Path(folder).glob("step-*") if (p / "state.json").is_file())
    return found[-1] if found else None


def load(folder: Path, model, optimizer, generator, settings: dict) -> TrainState:
    """Restore the latest checkpoint into the LoRA, the optimizer and the generator."""
    from safetensors.torch import load_file

    path = latest(folder)
    if path is None:
        raise InputError(f"--resume: no checkpoint in {folder}; train with --save-every N to make some.")
    saved = json.loads((path / "state.json").read_text())
    for key in MUST_MATCH:
        if key == "data_sha256" and saved["settings"].get(key) != settings.get(key):
            raise InputError(
                f"--resume: {path} was trained on other images or captions; remove {folder} to start over."
            )
        if saved["settings"].get(key) != settings.get(key):
            raise InputError(
                f"--resume: {path} was trained with {key}={saved['settings'].get(key)!r}, "
                f"not {settings.get(key)!r}; pass the same settings or remove {folder}."
            )
    weights = load_file(path / "lora.safetensors")
    params = dict(model.named_parameters())
    if set(weights) != {n for n, p in params.items() if p.requires_grad}:
        raise InputError(f"--resume: {path} holds a different set of LoRA layers; remove {folder} to start over.")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    generator.set_state(torch.load(path / "rng.pt", weights_only=True)["generator"])
    saved.pop("settings")
    log.info("resuming from %s", path)
    return TrainState(**saved)
