"""What a training run leaves behind: the LoRA (kohya format, self-describing metadata), report and preview."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from loratool import __version__
from loratool.files import atomic_path
from loratool.train.checkpoint import TrainState
from loratool.train.config import MIN_MARGIN_DB, TrainConfig, sidecars
from loratool.train.model import ADAPTER, Trainee

log = logging.getLogger(__name__)


def write_outputs(
    config: TrainConfig, trainee: Trainee, state: TrainState, lora_path: Path, timings: dict, interrupted: bool = False
) -> list[Path]:
    """LoRA, `<name>.report.json` and (with the copy check) `<name>.preview.png`; each written atomically."""
    from loratool.lora.apply import network_from_peft
    from loratool.lora.io import write_lora
    from loratool.lora.network import LoraNetwork

    network = LoraNetwork()
    for component, model in trainee.trained_modules().items():
        for module in network_from_peft(model, component, ADAPTER):
            network.add(module)
    # force: writability was checked before training; a run of hours must not fail at its very last line
    meta = metadata(config, trainee, state)
    write_lora(network, lora_path, keymap=trainee.keymap, fmt="kohya", metadata=meta, force=True)
    paths = [lora_path]
    side = sidecars(lora_path)
    with atomic_path(side["report"]) as tmp:
        tmp.write_text(json.dumps(report(config, trainee, state, timings, interrupted), indent=1))
    paths.append(side["report"])
    if trainee.checker and trainee.checker.rows:
        with atomic_path(side["preview"]) as tmp:
            trainee.checker.preview().save(tmp, format="PNG")
        paths.append(side["preview"])
    for path in paths:
        log.info("wrote %s", path)
    return paths


def metadata(config: TrainConfig, trainee: Trainee, state: TrainState) -> dict[str, str]:
    """Strings only (safetensors metadata); enough for `merge`/`sample` to read instead of asking again.

    write_lora adds the standard ss_* keys (dim, alpha, module, output name), modelspec and the sshs hashes.
    """
    from loratool.sdxl.reference import base_model_version

    mode = getattr(config, "mode", "copy")
    recipe = json.dumps(trainee.base_loras) if trainee.base_loras else mode
    meta = {
        "loratool_version": __version__,
        "loratool_mode": mode,
        "loratool_recipe": recipe,
        "loratool_base_model": config.model,
        "loratool_rank": str(config.rank),
        "loratool_alpha": str(config.alpha),
        "loratool_steps": str(state.step),
        "loratool_lr": str(config.lr),
        "loratool_seed": str(config.seed),
        "loratool_resolution": str(config.resolution),
        "loratool_config": json.dumps(config.record()),
        "ss_steps": str(state.step),
        "ss_learning_rate": str(config.lr),
        "ss_seed": str(config.seed),
        "ss_base_model_version": base_model_version(trainee.unet.config),
        "ss_sd_model_name": config.model,
        "ss_resolution": f"({config.resolution}, {config.resolution})",
        "modelspec.resolution": f"{config.resolution}x{config.resolution}",
    }
    if trainee.image is not None:
        meta |= {"loratool_image": trainee.image.path.name, "loratool_image_sha256": trainee.data_sha256}
    else:
        meta["loratool_dataset_sha256"] = trainee.data_sha256
    return meta | {
        k: v if isinstance(v, str) else json.dumps(v) for k, v in trainee.dataset.get("metadata", {}).items()
    }


def report(config: TrainConfig, trainee: Trainee, state: TrainState, timings: dict, interrupted: bool) -> dict:
    image = trainee.image
    train_s = timings.get("train_s")
    steps_run = timings.get("steps_run", state.step)
    data = {"dataset": trainee.dataset.get("report", {}) | {"sha256": trainee.data_sha256}}
    if image is not None:
        data = {
            "image": {
                "path": str(image.path),
                "sha256": trainee.data_sha256,
                "original_size": image.original_size,
                "crop_top_left": image.crop_top_left,
                "target_size": image.target_size,
            }
        }
    return {
        "loratool_version": __version__,
        "settings": config.record(),
        **data,
        "base_loras": trainee.base_loras,
        "steps_done": state.step,
        "interrupted": interrupted,
        "stopped_early": not interrupted and state.step < config.steps,
        "loss": state.losses,
        "eval_loss": {"start": state.eval_loss_start, "end": timings.get("eval_loss_end")},
        "copy": copy_curve(config, state, interrupted),
        "copy_checks": state.checks,
        "vae_psnr": trainee.vae_psnr,
        "timings": {
            "load_and_encode_s": round(timings.get("load_and_encode_s", 0.0), 3),
            "train_s": round(train_s, 3) if train_s is not None else None,
            "it_per_s": round(steps_run / train_s, 3) if train_s else None,
            "check_s": round(sum(c["seconds"] for c in state.checks), 3),
        },
        "peak_memory": peak_memory(),
    }


def copy_curve(config: TrainConfig, state: TrainState, interrupted: bool) -> dict | None:
    """The copy check's curve (step, mean and min PSNR of each check) and where training stopped, and why."""
    if not state.checks:
        return None
    last = state.checks[-1]
    reached = last["mean_psnr"] >= config.copy_target and min(last["psnr"]) >= config.copy_target - MIN_MARGIN_DB
    copied_early = config.stop_when_copied and reached and last["step"] == state.step < config.steps
    return {
        "target_db": config.copy_target,
        "stop_when_copied": config.stop_when_copied,
        "copied": bool(reached),
        "stopped_at": state.step,
        "stopped_because": "interrupted" if interrupted else "copied" if copied_early else "budget",
        "curve": [
            {"step": c["step"], "mean_psnr": round(c["mean_psnr"], 3), "min_psnr": round(min(c["psnr"]), 3)}
            for c in state.checks
        ],
    }


def peak_memory() -> dict:
    """Peak resident memory of this process and, on CUDA, the peak of torch's allocator."""
    import torch

    out: dict = {}
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # ru_maxrss is in bytes on macOS, KiB on Linux
        out["rss_peak_mb"] = round(rss / (2**20 if sys.platform == "darwin" else 1024), 1)
    except ImportError:  # Windows has no `resource`
        pass
    if torch.cuda.is_available():
        out["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out
