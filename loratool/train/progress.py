"""A rich progress bar on stderr: step, loss, it/s, ETA and the latest copy-check PSNR."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, total: int, start: int = 0, disable: bool = False) -> None:
        self._bar = Progress(
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[rate]} it/s"),
            TimeRemainingColumn(),
            TextColumn("PSNR {task.fields[psnr]}"),
            console=Console(stderr=True),
            transient=False,
            disable=disable,  # the other processes of a data-parallel run stay quiet
        )
        self._task = self._bar.add_task("train", total=total, completed=start, loss="-", rate="-", psnr="-")

    def __enter__(self) -> TrainProgress:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.__exit__(*exc)

    def update(self, step: int, loss: float, psnr: float | None) -> None:
        speed = self._bar.tasks[0].speed
        self._bar.update(
            self._task,
            completed=step,
            loss=f"{loss:.4f}",
            rate=f"{speed:.2f}" if speed else "-",
            psnr=f"{psnr:.2f} dB" if psnr is not None else "-",
        )
