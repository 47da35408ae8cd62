"""Slider quality on the demo model, per concept: one JSON line.

    python benchmarks/demo_sliders.py --concepts size,colour,position --seeds 8 [--recipe 2] [--pair-seed 0]
        [--keep DIR]      # keep the sweeps and sheets to look at
        [--weights DIR]   # another demo model (base/, refiner/), e.g. the previous version as a baseline
        [--lora-start F]  # slider off for the first F of the base steps (default: the demo's, 0.25 for size)

Runs `loratool demo` (copy both images, merge A:+1 B:-1 for recipe 2; recipe 4 trains a text slider from the
pair's two captions) for each concept on its pair, sweeps -1..1 in five scales in the pair's scene minus the
concept's words, and reports what demo.evaluation
measures (mean Spearman, mean largest-jump share, span of the pair's difference, other attributes kept),
the copy checks and the wall time of each concept, beside the empty-prompt sweep of the same slider.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from loratool import libraries


def run_concept(
    concept: str, seeds: list[int], recipe: int, pair_seed: int, root: Path, lora_start: float | None
) -> dict:
    from loratool import sample
    from loratool.demo.run import DemoConfig, measure_sweep, run

    config = DemoConfig(
        output=root / concept, concept=concept, recipe=recipe, seeds=seeds, pair_seed=pair_seed, lora_start=lora_start
    )
    start = time.perf_counter()
    summary = json.loads(run(config).read_text())
    seconds = time.perf_counter() - start
    empty = root / f"{concept}-empty"
    sample.run(
        sample.SampleConfig(
            output=empty, loras=[summary["slider"]], prompt="", scales=config.scales, seeds=seeds,
            steps=config.sample_steps, model="demo", refiner="demo", lora_start=config.lora_start,
        )
    )  # fmt: skip
    pair = (summary["pair_attribute"]["minus"], summary["pair_attribute"]["plus"])
    return {
        "prompt": summary["sweep_prompt"],
        "lora_start": config.lora_start,
        "in_prompt": summary["slider_quality"]["summary"],
        "empty_prompt": measure_sweep(config, empty, pair)["summary"],
        "copy_psnr_db": summary["copy_psnr_db"],
        "demo_seconds": round(seconds, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concepts", default="size,colour,position")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--recipe", type=int, default=2)
    p.add_argument("--pair-seed", type=int, default=0)
    p.add_argument("--weights", type=Path, default=None, help="demo model folder to use instead of the shipped one")
    p.add_argument("--lora-start", type=float, default=None, help="slider off for this fraction of the base steps")
    p.add_argument("--keep", type=Path, default=None, help="keep the sweeps and sheets here (default: a temp dir)")
    a = p.parse_args()
    libraries.quiet()  # only the results and our own progress on stdout/stderr
    import torch

    if a.weights is not None:
        from loratool.sdxl import models

        models.DEMO_WEIGHTS = a.weights.resolve()

    torch.set_num_threads(1)
    seeds = list(range(a.seeds))
    with tempfile.TemporaryDirectory() as tmp:
        root = a.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        result = {
            c: run_concept(c, seeds, a.recipe, a.pair_seed, root, a.lora_start)
            for c in a.concepts.split(",")
            if c.strip()
        }
    weights = str(a.weights) if a.weights else "shipped"
    print(json.dumps({"benchmark": "demo_sliders", "weights": weights, "recipe": a.recipe, "seeds": a.seeds,
                      "concepts": result}))  # fmt: skip


if __name__ == "__main__":
    main()
