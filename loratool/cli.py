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

from loratool import __version__, libraries, recorded
from loratool.demo.run import DemoConfig
from loratool.errors import InputError, LoratoolError
from loratool.merge import MergeConfig
from loratool.options import from_config, settings, typed
from loratool.sample.config import SWEEP, SampleConfig
from loratool.sdxl.index import parse_spec
from loratool.train.config import MODES, DreamboothConfig, SliderConfig, TrainConfig

app = typer.Typer(
    name="loratool",
    help="LoRA toolkit for Stable Diffusion XL: copy-machine training, exact SVD merges, slider sweeps.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="Settings from a TOML file (keys: the option names with _), or the config an output recorded "
        "(a LoRA .safetensors, report or sweep.json) to reproduce it. Flags override it.",
    ),
]


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
    libraries.quiet()


@app.command()
@handled
@from_config(TrainConfig, DreamboothConfig, SliderConfig)
def train(
    ctx: typer.Context,
    inputs: Annotated[
        list[Path] | None, typer.Argument(help="Training image (copy mode) or folder of images (dreambooth).")
    ] = None,
    mode: Annotated[str, typer.Option("--mode", help="copy | slider | dreambooth | wrong")] = "copy",
    pair: Annotated[
        tuple[Path, Path] | None,
        typer.Option("--pair", help="Two images A B: copy mode trains both; slider mode one slider, +1 → A, −1 → B."),
    ] = None,
    config_file: ConfigOpt = None,
    **given,
) -> None:
    """Train a LoRA: copy-machine (one image, empty prompt), a slider on a pair, dreambooth, or 'wrong'."""
    if pair and inputs:
        raise InputError("pass either one image or --pair A B, not both.")
    from_file = recorded.config_file(config_file, "train") if config_file else {}
    mode = mode if typed(ctx, "mode") else from_file.pop("mode", mode)
    from_file.pop("mode", None)
    if mode not in MODES:
        raise InputError(f"--mode must be {', '.join(MODES[:-1])} or {MODES[-1]}, not {mode!r}.")
    if pair:
        given |= {"images": list(pair), "pair": True}
    elif inputs or "images" not in from_file:  # images on the command line replace a file's (or its pair)
        given |= {"images": inputs or [], "pair": False}
    from loratool import train as verb

    cls = {"copy": TrainConfig, "slider": SliderConfig}.get(mode, DreamboothConfig)
    values = settings(cls, given, from_file, config_file, mode=(mode, (TrainConfig, DreamboothConfig, SliderConfig)))
    config = cls(**values, **({} if mode == "copy" else {"mode": mode}))
    for path in verb.run(config):
        typer.echo(str(path))


@app.command()
@handled
@from_config(SampleConfig)
def sample(
    slider: Annotated[
        str | None,
        typer.Option("--slider", help="Scale range A..B for the swept LoRA (default -1..1).", rich_help_panel=SWEEP),
    ] = None,
    points: Annotated[
        int | None,
        typer.Option("--points", help="Evenly spaced scales in --slider (0 added).", rich_help_panel=SWEEP),
    ] = None,
    values: Annotated[
        str | None, typer.Option("--values", help="Explicit scales v1,v2,… (not --slider).", rich_help_panel=SWEEP)
    ] = None,
    config_file: ConfigOpt = None,
    **given,
) -> None:
    """Render through SDXL base + refiner; with --lora, sweep one LoRA's scale (sheet, animation, sweep.json)."""
    from loratool import sample as verb
    from loratool.sample.scales import requested

    if (slider, points, values) != (None, None, None):
        given["scales"] = requested(slider, points, values)
    from_file = recorded.config_file(config_file, "sample") if config_file else {}
    config = settings(SampleConfig, given, from_file, config_file)
    if "model" not in config and config.get("loras") and (model := _recorded_model(config["loras"][0])):
        config["model"] = model
        if model == "demo":  # the demo's base goes with the demo's refiner
            config.setdefault("refiner", "demo")
    for path in verb.run(verb.SampleConfig(**config)):
        typer.echo(str(path))


@app.command()
@handled
@from_config(MergeConfig)
def merge(
    inputs: Annotated[
        list[str] | None, typer.Argument(help="LoRA files, each FILE[:WEIGHT] (weight default 1).", show_default=False)
    ] = None,
    concat: Annotated[bool, typer.Option("--concat", help="Same as --no-svd: exact rank concatenation.")] = False,
    config_file: ConfigOpt = None,
    **given,
) -> None:
    """Fold LoRAs at signed weights (A:1 B:-1 → slider) and re-factor each layer exactly with SVD."""
    from loratool import merge as verb

    if inputs:
        given["inputs"] = inputs  # FILE[:WEIGHT], parsed by MergeConfig
    if concat:
        given["svd"] = False
    config = settings(
        MergeConfig, given, recorded.config_file(config_file, "merge") if config_file else {}, config_file
    )
    if not config.get("model") and config.get("inputs"):
        config["model"] = _recorded_model(config["inputs"][0])
    typer.echo(str(verb.run(verb.MergeConfig(**config))))


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

    report = verb.run(verb.InspectConfig(file=file, model=model or _recorded_model(str(file))))
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
@from_config(DemoConfig)
def demo(**given) -> None:
    """Train a slider on the embedded demo model and render it, offline, in minutes."""
    from loratool.demo import run as verb

    for line in verb.describe(verb.run(DemoConfig(**given))):
        typer.echo(line)


def _recorded_model(lora) -> str | None:
    """A LoRA's recorded base model (FILE[:WEIGHT] or a parsed spec), when usable here; said on stderr, since
    it replaces the default."""
    path = parse_spec(lora if isinstance(lora, str | Path) else tuple(lora)).path
    model = recorded.base_model(path)
    if model:
        logging.getLogger("loratool").info("model: %s (recorded in %s)", model, path.name)
    return model


def main() -> None:
    app()
