"""Options declared once: a config field's `option(...)` holds its help, flags and train modes; `from_config`
turns those fields into a command's Typer options, and `settings` joins them with a `--config` file.

The options show the fields' defaults in `--help`, but only flags typed on the command line reach the config:
a `--config` file's value is overridden by a flag, never by a default. No torch here.
"""

from __future__ import annotations

import functools
import inspect
import math
import types
import typing
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any

from loratool.errors import InputError

KEY = "loratool_option"
INT_LIMIT = 2**63 - 1  # torch seeds and counts are 64-bit: a bigger integer would crash deep inside torch


@dataclass(frozen=True)
class Flag:
    """How a config field appears on the command line."""

    help: str
    flags: tuple[str, ...] = ()  # default: --field-name
    modes: tuple[str, ...] = ()  # the train modes it applies to; () → all
    cli_type: Any = None  # what the flag takes when the field's own type is no CLI type (e.g. "1024x768")
    panel: str | None = None  # rich help panel; default: the modes, or the common options

    def name(self, field_name: str) -> str:
        """The flag a user types (the long one), for error messages."""
        named = [f.split("/")[0] for f in self.flags if f.startswith("--")]  # "--svd/--no-svd" → --svd
        return (named or ["--" + field_name.replace("_", "-")])[-1]


def option(default: Any, help: str, *flags: str, **kw) -> Any:
    """A config field that is also a CLI option: `rank: int = option(8, "LoRA rank (1..128).")`; a list
    default is copied for each instance."""
    meta = {KEY: Flag(help, flags, **kw)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def declared(*classes: type) -> dict[str, tuple[Field, Flag, Any]]:
    """{field name: (field, Flag, type)} of every field with an option; the first class to declare one wins."""
    out: dict[str, tuple[Field, Flag, Any]] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if KEY in f.metadata and f.name not in out:
                out[f.name] = (f, f.metadata[KEY], hints[f.name])
    return out


def default_of(f: Field) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _cli_default(f: Field, kind: Any) -> Any:
    """The field's default as the flag would spell it: `--seeds 0`, `--crop 0,0`; None when it has none."""
    value = default_of(f)
    if value is MISSING or value in ([], ()):
        return None
    return ",".join(map(str, value)) if kind is str and isinstance(value, list | tuple) else value


def _cli_type(hint: Any) -> Any:
    """`int | None` → int; `list[str]` stays (a repeatable option)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _parameter(name: str, f: Field, flag: Flag, hint: Any) -> inspect.Parameter:
    import typer  # the CLI's dependency; the configs stay importable without it

    kind = flag.cli_type or _cli_type(hint)
    default = _cli_default(f, kind)
    panel = flag.panel or (f"{' and '.join(flag.modes).capitalize()} mode" if flag.modes else None)
    names = flag.flags or (flag.name(name),)
    shown = not (default is None or isinstance(default, bool) or default == "")
    opt = typer.Option(*names, help=flag.help, show_default=shown, rich_help_panel=panel)
    annotation = Annotated[kind if default is not None else kind | None, opt]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def from_config(*classes: type):
    """Decorate a command `def cmd(<explicit params>, **given)`: every field option of `classes` becomes a
    keyword option, and `given` receives only the options typed on the command line (so a `--config` file's
    value is overridden by a flag, never by a default)."""
    options = declared(*classes)

    def wrap(fn):
        import typer

        signature = inspect.signature(fn, eval_str=True)
        explicit = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        wants_ctx = "ctx" in signature.parameters
        if not wants_ctx:  # Typer hands the click context to a parameter annotated typer.Context
            explicit.insert(0, inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context))
        generated = [_parameter(name, *spec) for name, spec in options.items()]

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            ctx = kwargs["ctx"] if wants_ctx else kwargs.pop("ctx")
            given = {k: kwargs.pop(k) for k in options}
            return fn(*args, **kwargs, **{k: v for k, v in given.items() if typed(ctx, k)})

        parameters = sorted(explicit, key=lambda p: p.kind) + generated  # keyword-only after the rest
        wrapper.__signature__ = signature.replace(parameters=parameters)
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        return wrapper

    return wrap


def typed(ctx, name: str) -> bool:
    """Whether option `name` of the running command was typed on the command line (not left at its default)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def read_toml(path: Path) -> dict:
    import tomllib

    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise InputError(f"--config {path}: cannot read it ({exc.strerror}).") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"--config {path}: not valid TOML ({exc}).") from None


def settings(cls: type, given: dict, from_file: dict, source: Path | None, mode: tuple[str, tuple] = ("", ())) -> dict:
    """The file's settings overridden by the flags given, checked against `cls`'s fields.

    `mode` (train only) is the chosen mode and every class of the verb: a flag or key of another mode is an
    error that names it, except a file's key at its default (a recorded config holds every inherited field).
    """
    chosen, classes = mode
    known, others = {f.name: f for f in fields(cls)}, declared(*classes)
    for key, value in from_file.items():
        if key not in known and key not in others:
            raise InputError(f"--config {source}: unknown key {key!r}; keys are the setting names of {cls.__name__}.")
        _check_type(key, value, typing.get_type_hints(cls).get(key, Any), source)
    values = from_file | given
    for key, (_, flag, _) in others.items():
        if key not in values or not flag.modes or chosen in flag.modes:
            continue
        if key not in given and key in known and values[key] == default_of(known[key]):
            del values[key]
            continue
        where = flag.name(key) if key in given else f"{key} (in {source})"
        raise InputError(f"{where} is a {' and '.join(flag.modes)}-mode option; it does not apply to --mode {chosen}.")
    for name, f in known.items():
        if f.init and name not in values and f.default is MISSING and f.default_factory is MISSING:
            flag = f.metadata.get(KEY)
            raise InputError(f"{flag.name(name) if flag else name} is required (a flag, or a key of --config).")
    return values


def _check_type(key: str, value: Any, hint: Any, source: Path | None) -> None:
    """A file's value has the field's kind (numbers, text, true/false, lists); paths are text."""
    kinds = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    ok = []
    for kind in kinds:
        origin = typing.get_origin(kind) or kind
        ok += {float: [int, float], Path: [str], tuple: [list, tuple], type(None): [type(None)]}.get(origin, [origin])
    if Any in kinds or (isinstance(value, tuple(ok)) and (bool in ok or not isinstance(value, bool))):
        return
    raise InputError(f"--config {source}: {key} = {value!r} should be {_kind_name(hint)}.")


def _kind_name(hint: Any) -> str:
    text = hint.__name__ if isinstance(hint, type) else str(hint)
    return text.replace("typing.", "").replace("pathlib.", "").replace("NoneType", "None")


def check_numbers(config: Any) -> None:
    """Every number option of `config` (lists included) is finite and fits 64 bits: the one check that keeps
    NaN, inf and 1e23 out of the math. Run first in each config's `__post_init__`, before range checks, since
    `nan < 0` and `nan > 1` are both false."""
    for name, (_, flag, _) in declared(type(config)).items():
        value = getattr(config, name)
        for v in value if isinstance(value, list | tuple) else (value,):
            if isinstance(v, bool) or not isinstance(v, int | float):
                continue
            if isinstance(v, float) and not math.isfinite(v):
                raise InputError(f"{flag.name(name)} must be a finite number, not {v}.")
            if abs(v) > INT_LIMIT:
                raise InputError(f"{flag.name(name)} is out of range: {v} does not fit in 64 bits.")
