"""Typer wiring: flags → config → <verb>.run(config). The one place errors become messages.

No torch or diffusers at import time: `loratool --help` must be instant.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from loratool import __version__
from loratool.errors import LoratoolError, NotBuiltError

app = typer.Typer(
    name="loratool",
    help="LoRA toolkit for Stable Diffusion XL: copy-machine training, exact SVD merges, slider sweeps.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ModelOpt = Annotated[
    str,
    typer.Option("--model", help="Hub id, diffusers folder or single-file .safetensors SDXL checkpoint."),
]
ModelConfigOpt = Annotated[
    str | None,
    typer.Option("--model-config", help="Local diffusers folder whose configs describe a single-file --model."),
]
RefinerOpt = Annotated[str, typer.Option("--refiner", help="Refiner hub id, folder or file; 'none' disables it.")]
VaeOpt = Annotated[
    str | None,
    typer.Option(
        "--vae", help="VAE override; on CUDA fp16 the fp16-fix VAE is the default ('base' keeps the model's)."
    ),
]
PrecisionOpt = Annotated[str, typer.Option("--precision", help="auto|fp16|bf16|fp32 (auto: fp16 on GPU, fp32 on CPU).")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="cuda, cuda:1, mps or cpu (default: best available).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")]
OutFileOpt = Annotated[Path, typer.Option("-o", "--output", help="Output .safetensors file.")]


def handled(fn: Callable) -> Callable:
    """Turn LoratoolError into one line on stderr and its exit code; LORATOOL_DEBUG=1 keeps the traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LoratoolError as exc:
            if os.environ.get("LORATOOL_DEBUG") == "1":
                raise
            typer.echo(f"loratool: error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        typer.echo(f"loratool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True)] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="More diagnostics on stderr.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr, force=True
    )
    # transformers/diffusers reset their loggers on import, so quiet them through their own variables.
    for lib in ("TRANSFORMERS", "DIFFUSERS"):
        os.environ.setdefault(f"{lib}_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for noisy in ("accelerate", "peft", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


@app.command()
@handled
def train(
    inputs: Annotated[list[Path] | None, typer.Argument(help="Training image (copy mode) or folder.")] = None,
    output: OutFileOpt = Path("lora.safetensors"),
    mode: Annotated[str, typer.Option("--mode", help="copy | dreambooth | wrong")] = "copy",
    model: ModelOpt = "stabilityai/stable-diffusion-xl-base-1.0",
) -> None:
    """Train a LoRA: copy-machine (one image, empty prompt), dreambooth, or the negative 'wrong' LoRA."""
    raise NotBuiltError("loratool train is not built yet; it arrives with the copy-machine training issue.")


@app.command()
@handled
def sample(
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder.")] = Path("samples"),
    prompt: Annotated[str, typer.Option("--prompt", help="Prompt for both text encoders.")] = "",
    prompt_2: Annotated[str | None, typer.Option("--prompt-2", help="Prompt for text encoder 2 only.")] = None,
    negative_prompt: Annotated[str, typer.Option("--negative-prompt")] = "",
    negative_prompt_2: Annotated[str | None, typer.Option("--negative-prompt-2")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    seeds: Annotated[str | None, typer.Option("--seeds", help="Comma-separated seeds (rows of the sheet).")] = None,
    steps: Annotated[int, typer.Option("--steps")] = 30,
    guidance: Annotated[float, typer.Option("--guidance")] = 5.0,
    width: Annotated[int | None, typer.Option("--width", help="Default: the model's native size.")] = None,
    height: Annotated[int | None, typer.Option("--height")] = None,
    original_size: Annotated[str | None, typer.Option("--original-size", help="Micro-conditioning WxH.")] = None,
    crop: Annotated[str, typer.Option("--crop", help="Micro-conditioning crop X,Y (left,top).")] = "0,0",
    target_size: Annotated[str | None, typer.Option("--target-size", help="Micro-conditioning WxH.")] = None,
    scheduler: Annotated[str | None, typer.Option("--scheduler", help="euler | euler-a | dpm++2m | ddim.")] = None,
    high_noise_frac: Annotated[
        float | None, typer.Option("--high-noise-frac", help="Base's share of the schedule (default 0.8).")
    ] = None,
    refiner_frac: Annotated[
        float | None,
        typer.Option("--refiner-frac", help="Refiner runs only the last F of the schedule, the base the rest."),
    ] = None,
    lora: Annotated[list[str] | None, typer.Option("--lora", help="LoRA FILE[:WEIGHT] (repeatable).")] = None,
    sweep: Annotated[str | None, typer.Option("--sweep", help="The --lora FILE to sweep (with several).")] = None,
    slider: Annotated[
        str | None, typer.Option("--slider", help="Scale range A..B for the swept LoRA (default -1..1).")
    ] = None,
    points: Annotated[int, typer.Option("--points", help="Evenly spaced scales in --slider (0 added).")] = 5,
    values: Annotated[str | None, typer.Option("--values", help="Explicit scales v1,v2,… (not --slider).")] = None,
    lora_start: Annotated[
        float, typer.Option("--lora-start", help="Swept LoRA off for this fraction of the base steps.")
    ] = 0.0,
    model: ModelOpt = "stabilityai/stable-diffusion-xl-base-1.0",
    model_config: ModelConfigOpt = None,
    refiner: RefinerOpt = "stabilityai/stable-diffusion-xl-refiner-1.0",
    refiner_config: Annotated[str | None, typer.Option("--refiner-config")] = None,
    vae: VaeOpt = None,
    precision: PrecisionOpt = "auto",
    device: DeviceOpt = None,
    cpu_offload: Annotated[bool, typer.Option("--cpu-offload", help="Model CPU offload (CUDA only).")] = False,
    compile_unet: Annotated[bool, typer.Option("--compile", help="torch.compile the UNet (CUDA only).")] = False,
    force: ForceOpt = False,
) -> None:
    """Render through SDXL base + refiner; with --lora, sweep one LoRA's scale (sheet, animation, sweep.json)."""
    from loratool import sample as verb
    from loratool import sweep as scales

    config = verb.SampleConfig(
        output=output,
        prompt=prompt,
        prompt_2=prompt_2,
        negative_prompt=negative_prompt,
        negative_prompt_2=negative_prompt_2,
        seeds=verb.parse_seeds(seeds) if seeds else [seed],
        steps=steps,
        guidance=guidance,
        width=width,
        height=height,
        original_size=verb.parse_pair(original_size, "--original-size", "x"),
        crop=verb.parse_pair(crop, "--crop", ","),
        target_size=verb.parse_pair(target_size, "--target-size", "x"),
        scheduler=scheduler,
        high_noise_frac=high_noise_frac,
        refiner_frac=refiner_frac,
        loras=lora or [],
        sweep=sweep,
        scales=scales.requested(slider, points, values),
        lora_start=lora_start,
        model=model,
        model_config=model_config,
        refiner=refiner,
        refiner_config=refiner_config,
        vae=vae,
        precision=precision,
        device=device,
        cpu_offload=cpu_offload,
        compile=compile_unet,
        force=force,
    )
    for path in verb.run(config):
        typer.echo(str(path))


@app.command()
@handled
def merge(
    inputs: Annotated[list[str], typer.Argument(help="LoRA files, each FILE[:WEIGHT] (weight default 1).")],
    output: OutFileOpt = Path("merged.safetensors"),
    svd: Annotated[bool, typer.Option("--svd/--no-svd")] = True,
    rank: Annotated[int | None, typer.Option("--rank")] = None,
) -> None:
    """Fold LoRAs at signed weights (A:1 B:-1 → slider) and re-factor each layer exactly with SVD."""
    raise NotBuiltError("loratool merge is not built yet; it arrives with the merge issue.")


@app.command()
@handled
def inspect(
    file: Annotated[Path, typer.Argument(help="LoRA .safetensors file.")],
    model: Annotated[
        str | None, typer.Option("--model", help="Diffusers folder to check against (default: SDXL 1.0 base).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show a LoRA file's format, components, ranks, alphas and metadata, and check it fits a model."""
    import json

    from loratool import inspect as verb

    report = verb.run(verb.InspectConfig(file=file, model=model))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    for key, value in report.items():
        if key != "metadata":
            typer.echo(f"{key:>14}: {value}")
    for key, value in sorted(report["metadata"].items()):
        typer.echo(f"{'meta ' + key:>14}: {value[:100]}")


@app.command()
@handled
def demo(output: Annotated[Path, typer.Option("-o", "--output")] = Path("demo-out")) -> None:
    """Train a slider on the embedded demo model and render it, offline, in minutes."""
    raise NotBuiltError("loratool demo is not built yet; it arrives with the demo-model issue.")


def main() -> None:
    app()
