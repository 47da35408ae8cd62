"""Per-image time of `sample --reference` vs the plain render, same settings, one process: the demo model
(128 px) on CPU by default. Two UNet passes a step (write, then read) cost about 2x. Prints ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from loratool import libraries
from loratool.demo import shapes
from loratool.sample import SampleConfig, _load
from loratool.sample.pipeline import embeddings, render
from loratool.sample.reference import guides, read_reference
from loratool.sample.sweep import make_prompt, make_schedule
from loratool.sdxl.models import pick_runtime

SETTINGS = {
    "plain": {},
    "attn": {},
    "adain": {"reference_mode": "adain"},
    "attn+adain": {"reference_mode": "attn+adain"},
}


def per_image(base, config: SampleConfig, seed: int) -> float:
    prompt, schedule = make_prompt(config), make_schedule(base, config)
    embeds = embeddings(base, prompt)
    size = (schedule.width, schedule.height)
    with ExitStack() as stack:
        schedule.guides = [stack.enter_context(g) for g in guides(base, None, read_reference(config), size, prompt.cfg)]
        start = time.perf_counter()
        render(base, None, prompt, schedule, seed, embeds, None)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--images", type=int, default=5)
    args = parser.parse_args()
    libraries.quiet()  # only the results and our own progress on stdout/stderr
    torch.set_num_threads(1)  # a shared machine: one thread gives steadier timings
    reference = Path(tempfile.mkdtemp()) / "reference.png"
    shapes.render(shapes.Scene("square", 120.0, 26.0, 92.0, 70.0)).save(reference)
    common = dict(prompt="a red circle on the left", steps=args.steps, model=args.model, refiner="none")
    base, _ = _load(SampleConfig(**common), pick_runtime("cpu"))
    base.set_progress_bar_config(disable=True)
    configs = {
        name: SampleConfig(**common, **({} if name == "plain" else {"reference": reference} | extra))
        for name, extra in SETTINGS.items()
    }
    per_image(base, configs["plain"], 0)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in configs}
    for seed in range(args.images):  # settings take turns, so a busy neighbour slows them all alike
        for name, config in configs.items():
            times[name].append(per_image(base, config, seed))
    seconds = {name: statistics.median(t) for name, t in times.items()}
    ratio = {name: round(s / seconds["plain"], 3) for name, s in seconds.items() if name != "plain"}
    print(
        json.dumps(
            {
                "benchmark": "reference",
                "model": args.model,
                "device": "cpu",
                "steps": args.steps,
                "seconds_per_image": {k: round(v, 4) for k, v in seconds.items()},
                "ratio_vs_plain": ratio,
                "variant": "fine (style fidelity 0.5)",
            }
        )
    )


if __name__ == "__main__":
    main()
