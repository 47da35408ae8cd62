"""Resumable training state in `<name>.ckpt/step-NNNNNN/`: LoRA weights, optimizer, RNG, step and curves.

Everything that decides the next step is saved, so `--resume` reaches the same weights as a run
that was never stopped. The two latest checkpoints are kept, each written atomically: when the latest is
damaged (a full disk, a file copied half-way), `load` says so and resumes from the one before.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from loratool import recorded
from loratool.errors import InputError, LoratoolError
from loratool.files import atomic_path, sweep

log = logging.getLogger(__name__)
KEEP = 2  # the latest and the one before, to fall back on

# Settings that change the trajectory: resuming with different values would silently train something else.
# Dreambooth-only keys are absent (None == None) in copy mode; data_sha256 covers the image(s) themselves.
MUST_MATCH = (
    *("rank", "alpha", "lr", "seed", "resolution", "optimizer", "gradient_accumulation", "noise_offset"),
    *("pure_noise", "base_loras", "mode", "prompt", "class_prompt", "num_class_images", "prior_loss_weight"),
    *("batch_size", "train_text_encoder", "conv_rank", "conv_alpha", "data_sha256", "multires_noise"),
    *("blocks", "vary"),
)
ADDED_LATER = recorded.ADDED_LATER["train"]  # what an older checkpoint, lacking a setting, trained with


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
    sweep(folder, ".step-*.tmp-*")  # what a killed run left, whatever step it was writing
    with atomic_path(target) as tmp:
        tmp.mkdir(parents=True)
        save_file(trainable_state(model), tmp / "lora.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save({"generator": generator.get_state()}, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(asdict(state) | {"settings": settings}))
    for old in steps(folder)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    log.debug("checkpoint %s", target)
    return target


def steps(folder: Path) -> list[Path]:
    """Checkpoint folders, oldest first (temporary ones have hidden names and never match)."""
    return sorted(p for p in Path(folder).glob("step-*") if p.is_dir())


def latest(folder: Path) -> Path | None:
    found = steps(folder)
    return found[-1] if found else None


class DamagedCheckpoint(LoratoolError):
    """A checkpoint file that cannot be read back; `load` falls back to an older checkpoint."""


def load(folder: Path, model, optimizer, generator, settings: dict) -> TrainState:
    """Restore the latest intact checkpoint into the LoRA, the optimizer and the generator."""
    found = steps(folder)
    if not found:
        raise InputError(f"--resume: no checkpoint in {folder}; drop --resume to start afresh.")
    damage = []
    for path in reversed(found):
        try:
            state = _load(path, model, optimizer, generator, settings)
        except DamagedCheckpoint as exc:
            damage.append(str(exc))
            continue
        if damage:
            log.warning("warning: %s; resuming from the older %s instead.", damage[0], path)
        else:
            log.info("resuming from %s", path)
        return state
    raise InputError(f"--resume: {damage[0]}; no intact checkpoint is left: remove {folder} to start over.")


def _read(path: Path, reader):
    """Read one checkpoint file; any failure is damage that names the file."""
    if not path.is_file():
        raise DamagedCheckpoint(f"{path} is missing")
    try:
        return reader(path)
    except Exception as exc:  # truncated or garbage: safetensors, pickle and json each raise their own kinds
        raise DamagedCheckpoint(f"{path} is damaged ({type(exc).__name__})") from None


def _state(path: Path) -> dict:
    saved = _read(path / "state.json", lambda p: json.loads(p.read_text()))
    want = {f.name for f in fields(TrainState)} | {"settings"}
    if not isinstance(saved, dict) or set(saved) != want or not isinstance(saved.get("settings"), dict):
        got = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
        raise DamagedCheckpoint(f"{path / 'state.json'} holds {got}, not {sorted(want)}")
    if not isinstance(saved["step"], int) or saved["step"] < 0:
        raise DamagedCheckpoint(f"{path / 'state.json'} holds step {saved['step']!r}")
    return saved


def _check_settings(path: Path, saved: dict, settings: dict) -> None:
    folder = path.parent
    for key in MUST_MATCH:
        if key == "data_sha256" and saved.get(key) != settings.get(key):
            raise InputError(
                f"--resume: {path} was trained on other images or captions; remove {folder} to start over."
            )
        was = saved.get(key, ADDED_LATER.get(key))  # a setting older checkpoints lack: what they trained with
        if was != settings.get(key):
            raise InputError(
                f"--resume: {path} was trained with {key}={was!r}, "
                f"not {settings.get(key)!r}; pass the same settings or remove {folder}."
            )


def _load(path: Path, model, optimizer, generator, settings: dict) -> TrainState:
    from safetensors.torch import load_file

    saved = _state(path)
    _check_settings(path, saved.pop("settings"), settings)
    weights = _read(path / "lora.safetensors", load_file)
    optimizer_state = _read(path / "optimizer.pt", lambda p: torch.load(p, weights_only=True))
    rng = _read(path / "rng.pt", lambda p: torch.load(p, weights_only=True))
    params = dict(model.named_parameters())
    if set(weights) != {n for n, p in params.items() if p.requires_grad}:
        raise InputError(f"--resume: {path} holds a different set of LoRA layers; remove {path.parent} to start over.")
    if any(weights[n].shape != params[n].shape or not torch.isfinite(weights[n]).all() for n in weights):
        raise DamagedCheckpoint(f"{path / 'lora.safetensors'} holds wrong shapes or non-finite numbers")
    try:  # each validates before it changes anything; an older checkpoint overwrites a partial load anyway
        generator.set_state(rng["generator"])
        optimizer.load_state_dict(optimizer_state)
    except Exception as exc:  # a readable pickle of the wrong thing
        raise DamagedCheckpoint(
            f"{path}: optimizer.pt or rng.pt does not fit this run ({type(exc).__name__})"
        ) from None
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    return TrainState(**saved)
