"""Text-slider (recipe 4) training on the demo model: the LoRA-off estimates of a step made once and reused by
its other batches (shipped) vs made again for every batch (the baseline), in one process, alternated, best of two
runs each. Prints ONE JSON line.

    python benchmarks/text_slider.py [--steps 60]

A step trains 4 batches (the target prompt and the empty prompt, each at +1 and −1) from one noise and timestep.
Made for every batch (one UNet call of three prompts each, as before this change), the base's estimates in the
batch's prompt and the two guide prompts cost 12 UNet batches of rows a step; made once, 4 (the guide's pair once,
the prompt once per context). Both variants train the same slider;
`max_abs_diff` is the largest difference between their factors (float rounding of the batch layout only).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from loratool import libraries

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def train_once(steps: int, output: Path) -> dict:
    from loratool import train

    config = train.SliderConfig(
        images=[], output=output, model="demo", positive="a large square", negative="a small square", target="a square",
        steps=steps,
    )  # fmt: skip
    train.run(config)
    return json.loads(output.with_suffix(".report.json").read_text())["timings"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    a = p.parse_args()
    libraries.quiet()  # only the results and our own progress on stdout/stderr
    import torch
    from safetensors.torch import load_file

    from loratool.train import loss

    torch.set_num_threads(1)
    reuse = loss._frozen_estimates
    variants = {"every_batch": lambda unet, memo, *args: reuse(unet, {}, *args), "once_per_step": reuse}
    result, factors = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(2):  # alternated, best of two each: the first run in a process is the slowest
            for name, estimate in variants.items():
                loss._frozen_estimates = estimate  # every_batch keeps nothing: the baseline
                path = Path(tmp) / f"{name}{round_}.safetensors"
                timings = train_once(a.steps, path)
                if name not in result or timings["it_per_s"] > result[name]["it_per_s"]:
                    result[name] = timings
                factors[name] = load_file(path)
        loss._frozen_estimates = reuse
    every, once = factors["every_batch"], factors["once_per_step"]
    diff = max((every[k].float() - once[k].float()).abs().max().item() for k in every)
    speedup = result["once_per_step"]["it_per_s"] / result["every_batch"]["it_per_s"]
    print(json.dumps({"benchmark": "text_slider", "steps": a.steps, **result, "speedup": round(speedup, 3),
                      "max_abs_diff": diff}))  # fmt: skip


if __name__ == "__main__":
    main()
