"""`loratool train`: copy-machine, slider, dreambooth and the negative "wrong" LoRA, through one loop.

Each mode is a data source: it turns a config into Trainees (the base with a LoRA injected, and its batches).
`run` picks the mode, checks what can be checked before any model loads, and hands each Trainee to the loop,
which imports no mode.

The modes and the loop (torch) load inside `run`: the CLI builds its options from `train.config`, and
importing this package must not cost `loratool --help` the seconds torch takes.
"""

from contextlib import ExitStack
from pathlib import Path

from loratool import libraries
from loratool.files import output_lock
from loratool.train.config import DreamboothConfig, SliderConfig, TrainConfig


def run(config: TrainConfig) -> list[Path]:
    """Train one LoRA per image (two for --pair in copy mode), per pair (slider) or per dataset; returns every
    file written."""
    from loratool.train import copy_machine, dreambooth, slider
    from loratool.train.loop import check_outputs, preflight, train

    modes = {"copy": copy_machine, "slider": slider, "dreambooth": dreambooth, "wrong": dreambooth}
    mode = modes[getattr(config, "mode", "copy")]
    if config.quantize_base or config.optimizer == "adamw8bit":
        libraries.with_bitsandbytes()  # the CLI keeps it (and its CPU-kernel warning) out of other runs
    preflight(config)
    for path in config.lora_paths():
        check_outputs(config, path)
    written: list[Path] = []
    with ExitStack() as locks:  # a second run to the same output refuses instead of racing this one
        for path in config.lora_paths():
            locks.enter_context(output_lock(path))
        for trainee, path, timings in mode.trainees(config):  # lazily: one base in memory at a time
            written += train(config, trainee, path, timings)
    return written


def __getattr__(name: str):
    if name == "TrainingInterrupted":  # lazily, like the loop it comes from
        from loratool.train.loop import TrainingInterrupted

        return TrainingInterrupted
    raise AttributeError(name)


__all__ = ["DreamboothConfig", "SliderConfig", "TrainConfig", "TrainingInterrupted", "run"]
