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
from loratool.errors import InputError, LoratoolError

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
    inputs: Annotated[
        list[Path] | None, typer.Argument(help="Training image (copy mode) or folder of images (dreambooth).")
    ] = None,
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Output .safetensors (with --pair: a prefix for _a/_b).")
    ] = Path("lora.safetensors"),
    mode: Annotated[str, typer.Option("--mode", help="copy | dreambooth | wrong")] = "copy",
    pair: Annotated[
        tuple[Path, Path] | None, typer.Option("--pair", help="Two images A B: trains both, identical settings.")
    ] = None,
    model: ModelOpt = "stabilityai/stable-diffusion-xl-base-1.0",
    model_config: ModelConfigOpt = None,
    rank: Annotated[int, typer.Option("--rank", help="LoRA rank (1..128).")] = 8,
    alpha: Annotated[float, typer.Option("--alpha", help="LoRA alpha; scale = alpha / rank.")] = 8.0,
    steps: Annotated[int, typer.Option("--steps")] = 1500,
    lr: Annotated[float, typer.Option("--lr", help="Learning rate.")] = 1e-4,
    resolution: Annotated[int, typer.Option("--resolution", help="Bucket area ≈ resolution² (multiple of 64).")] = 1024,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    optimizer: Annotated[str, typer.Option("--optimizer", help="adamw | adamw8bit (CUDA).")] = "adamw",
    mixed_precision: Annotated[str, typer.Option("--mixed-precision", help="no | fp16 | bf16")] = "no",
    gradient_accumulation: Annotated[int, typer.Option("--gradient-accumulation")] = 1,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", help="Less memory.")] = False,
    noise_offset: Annotated[float, typer.Option("--noise-offset")] = 0.0,
    pure_noise: Annotated[
        float, typer.Option("--pure-noise", help="Copy mode: share of steps trained from pure noise, e.g. 0.25.")
    ] = 0.0,
    min_snr_gamma: Annotated[float | None, typer.Option("--min-snr-gamma", help="Min-SNR weighting, e.g. 5.")] = None,
    check_every: Annotated[
        int | None, typer.Option("--check-every", help="Copy check every N steps (default steps/10; 0: off).")
    ] = None,
    check_seeds: Annotated[int, typer.Option("--check-seeds", help="Seeds rendered per check.")] = 2,
    check_steps: Annotated[int, typer.Option("--check-steps", help="Sampling steps per check render.")] = 8,
    stop_when_copied: Annotated[
        float | None, typer.Option("--stop-when-copied", help="Stop once mean PSNR ≥ this many dB.")
    ] = None,
    save_every: Annotated[int, typer.Option("--save-every", help="Checkpoint every N steps into <name>.ckpt/.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint.")] = False,
    base_lora: Annotated[
        list[str] | None, typer.Option("--base-lora", help="FILE[:WEIGHT] folded into the base first (repeatable).")
    ] = None,
    quantize_base: Annotated[str | None, typer.Option("--quantize-base", help="nf4 | int8 (CUDA).")] = None,
    device: DeviceOpt = None,
    force: ForceOpt = False,
    prompt: Annotated[str, typer.Option("--prompt", help="Dreambooth instance prompt (.txt captions win).")] = "",
    class_prompt: Annotated[
        str | None, typer.Option("--class-prompt", help="Dreambooth prior preservation: the class, e.g. 'a dog'.")
    ] = None,
    class_dir: Annotated[
        Path | None, typer.Option("--class-dir", help="Class images; missing ones are generated (default <out>.class).")
    ] = None,
    num_class_images: Annotated[int, typer.Option("--num-class-images")] = 100,
    prior_loss_weight: Annotated[float, typer.Option("--prior-loss-weight")] = 1.0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per step, all from one aspect bucket.")] = 1,
    cache_dir: Annotated[
        Path | None, typer.Option("--cache-dir", help="Keep latents and prompt embeddings on disk for later runs.")
    ] = None,
    train_text_encoder: Annotated[
        bool, typer.Option("--train-text-encoder", help="LoRAs on both text encoders too (dreambooth).")
    ] = False,
    num_images: Annotated[int, typer.Option("--num-images", help="Wrong mode: failure images to generate.")] = 100,
    wrong_dir: Annotated[
        Path | None, typer.Option("--wrong-dir", help="Wrong mode's dataset folder (default <out>.wrong), reused.")
    ] = None,
    generate_steps: Annotated[
        int, typer.Option("--generate-steps", help="Sampling steps per generated class/wrong image.")
    ] = 25,
) -> None:
    """Train a LoRA: copy-machine (one image, empty prompt), dreambooth, or the negative 'wrong' LoRA."""
    if mode not in ("copy", "dreambooth", "wrong"):
        raise InputError(f"--mode must be copy, dreambooth or wrong, not {mode!r}.")
    if pair and inputs:
        raise InputError("pass either one image or --pair A B, not both.")
    from loratool import train as verb

    extra = {}
    if mode != "copy":
        extra = dict(
            mode=mode,
            prompt=prompt,
            class_prompt=class_prompt,
            class_dir=class_dir,
            num_class_images=num_class_images,
            prior_loss_weight=prior_loss_weight,
            batch_size=batch_size,
            cache_dir=cache_dir,
            train_text_encoder=train_text_encoder,
            num_images=num_images,
            wrong_dir=wrong_dir,
            generate_steps=generate_steps,
        )
    config = (verb.DreamboothConfig if extra else verb.TrainConfig)(
        **extra,
        images=list(pair) if pair else list(inputs or []),
        output=output,
        pair=pair is not None,
        model=model,
        model_config=model_config,
        rank=rank,
        alpha=alpha,
        steps=steps,
        lr=lr,
        resolution=resolution,
        seed=seed,
        optimizer=optimizer,
        mixed_precision=mixed_precision,
        gradient_accumulation=gradient_accumulation,
        gradient_checkpointing=gradient_checkpointing,
        noise_offset=noise_offset,
        pure_noise=pure_noise,
        min_snr_gamma=min_snr_gamma,
        check_every=check_every,
        check_seeds=check_seeds,
        check_steps=check_steps,
        stop_when_copied=stop_when_copied,
        save_every=save_every,
        resume=resume,
        base_loras=base_lora or [],
        quantize_base=quantize_base,
        device=device,
        force=force,
    )
    for path in verb.run(config):
        typer.echo(str(path))


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
    reference: Annotated[
        Path | None, typer.Option("--reference", help="Pull the render toward this image (reference-only).")
    ] = None,
    reference_mode: Annotated[
        str | None, typer.Option("--reference-mode", help="attn | adain | attn+adain (default attn).")
    ] = None,
    reference_variant: Annotated[
        str | None, typer.Option("--reference-variant", help="coarse | fine (default fine).")
    ] = None,
    style_fidelity: Annotated[
        float | None, typer.Option("--style-fidelity", help="Fine only: 0 (= coarse) .. 1 (default 0.5).")
    ] = None,
    reference_weight: Annotated[
        float | None, typer.Option("--reference-weight", help="Share of UNet layers that see it, 0..1 (default 1).")
    ] = None,
    reference_refiner: Annotated[bool, typer.Option("--reference-refiner", help="Guide the refiner too.")] = False,
) -> None:
    """Render through SDXL base + refiner; with --lora, sweep one LoRA's scale (sheet, animation, sweep.json)."""
    from loratool import sample as verb
    from loratool.sample.config import parse_pair, parse_seeds
    from loratool.sample.scales import requested

    config = verb.SampleConfig(
        output=output,
        prompt=prompt,
        prompt_2=prompt_2,
        negative_prompt=negative_prompt,
        negative_prompt_2=negative_prompt_2,
        seeds=parse_seeds(seeds) if seeds else [seed],
        steps=steps,
        guidance=guidance,
        width=width,
        height=height,
        original_size=parse_pair(original_size, "--original-size", "x"),
        crop=parse_pair(crop, "--crop", ","),
        target_size=parse_pair(target_size, "--target-size", "x"),
        scheduler=scheduler,
        high_noise_frac=high_noise_frac,
        refiner_frac=refiner_frac,
        loras=lora or [],
        sweep=sweep,
        scales=requested(slider, points, values),
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
        reference=reference,
        reference_mode=reference_mode,
        reference_variant=reference_variant,
        style_fidelity=style_fidelity,
        reference_weight=reference_weight,
        reference_refiner=reference_refiner,
    )
    for path in verb.run(config):
        typer.echo(str(path))


@app.command()
@handled
def merge(
    inputs: Annotated[list[str], typer.Argument(help="LoRA files, each FILE[:WEIGHT] (weight default 1).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output .safetensors (or folder with --into-base).")],
    svd: Annotated[
        bool | None, typer.Option("--svd/--no-svd", help="Exact SVD re-factoring (default for 2+ inputs).")
    ] = None,
    concat: Annotated[bool, typer.Option("--concat", help="Same as --no-svd: exact rank concatenation.")] = False,
    rank: Annotated[int | None, typer.Option("--rank", help="Truncate each module to this rank.")] = None,
    sv_fro: Annotated[float | None, typer.Option("--sv-fro", help="Keep the Frobenius-norm fraction F.")] = None,
    sv_ratio: Annotated[float | None, typer.Option("--sv-ratio", help="Keep singular values > S0/R.")] = None,
    alpha: Annotated[float | None, typer.Option("--alpha", help="Output alpha (default: rank, scale 1).")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="fp16 | bf16 | fp32 for the output.")] = "fp16",
    float64: Annotated[bool, typer.Option("--float64", help="Compute in float64 (default float32).")] = False,
    fmt: Annotated[str, typer.Option("--format", help="kohya (default) or diffusers.")] = "kohya",
    model: Annotated[
        str | None, typer.Option("--model", help="Base to check against / fold into (default: SDXL 1.0 base).")
    ] = None,
    model_config: ModelConfigOpt = None,
    into_base: Annotated[bool, typer.Option("--into-base", help="Fold the LoRAs into --model, write a model.")] = False,
    report: Annotated[Path | None, typer.Option("--report", help="Write the per-module table as JSON.")] = None,
    force: ForceOpt = False,
) -> None:
    """Fold LoRAs at signed weights (A:1 B:-1 → slider) and re-factor each layer exactly with SVD."""
    from loratool import merge as verb

    config = verb.MergeConfig(
        inputs=inputs,  # FILE[:WEIGHT], parsed by MergeConfig
        output=output,
        svd=False if concat else svd,
        rank=rank,
        sv_fro=sv_fro,
        sv_ratio=sv_ratio,
        alpha=alpha,
        dtype=dtype,
        float64=float64,
        format=fmt,
        model=model,
        model_config=model_config,
        into_base=into_base,
        report=report,
        force=force,
    )
    typer.echo(str(verb.run(config)))


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
def demo(
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder.")] = Path("demo-out"),
    concept: Annotated[str, typer.Option("--concept", help="size | colour | position")] = "size",
    recipe: Annotated[int, typer.Option("--recipe", help="2: train both, merge A:1 B:-1. 1: train B on A.")] = 2,
    steps: Annotated[int, typer.Option("--steps", help="Copy-machine steps per LoRA.")] = 300,
    seeds: Annotated[str, typer.Option("--seeds", help="Comma-separated seeds of the sweep.")] = "0,1,2,3",
    prompt: Annotated[
        str | None, typer.Option("--prompt", help="Prompt of the sweep (default: the pair's scene minus the concept).")
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Train a slider on the embedded demo model and render it, offline, in minutes."""
    from loratool.demo import run as verb
    from loratool.sample.config import parse_seeds

    config = verb.DemoConfig(
        output=output,
        concept=concept,
        recipe=recipe,
        steps=steps,
        seeds=parse_seeds(seeds),
        prompt=prompt,
        force=force,
    )
    for line in verb.describe(verb.run(config)):
        typer.echo(line)


def main() -> None:
    app()
