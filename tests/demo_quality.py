"""What the demo-quality tests share: seeds, floors, a demo run, renders and the slider check.

Each concept's minutes-long runs (two copy LoRAs on its pair, the merged slider swept) live in one test file,
tests/test_demo_<concept>.py, so that pytest-xdist's --dist loadfile (pyproject.toml) makes each run once, on
one worker, while the other worker takes another file. The figures are what `loratool.demo.evaluation`
measures; the closing notes of the demo issues give them over 8 seeds.
"""

import json

import numpy as np
import torch
from PIL import Image

SEEDS = [0, 1, 2, 3]
UNSEEN = [100, 101, 102, 103]  # seeds no copy check renders
# Floors under what the shipped lab (v2 fine-tuned with decoys) measures on these 4 seeds (8-seed figures are
# in datasets/README.md). The aims of the demo-v2 issue (Spearman 0.95, largest jump 0.5, kept 0.9) are not
# all met yet: these floors catch a regression to v1's switches (largest jump 0.73-0.90 on the same pairs),
# not the aim. Place gets its own ceiling: a place slider flips each seed's square from one side to the other
# at one scale (a 17-scale sweep shows the flip inside one 0.125 step; datasets/README.md), so its largest
# jump on 4 seeds is 0.76 here, 0.68 on v2.
FLOORS = {"mean_spearman": 0.7, "span": 0.5}
MAX_GLIDE = {"size": 0.72, "colour": 0.72, "position": 0.8}
# Size trains its halves on the mid and up blocks with hue varied, which keeps the scene on 0.69 of these
# renders (halves on every block, which drag hue or shape along: 0.31); colour is swept from a quarter in (1.0).
KEPT = {"size": 0.5, "colour": 0.85, "position": 0.5}


def run_demo(tmp_path_factory, concept):
    from loratool.demo.run import DemoConfig, run

    out = tmp_path_factory.mktemp(concept) / "demo-out"
    return json.loads(run(DemoConfig(output=out, concept=concept, seeds=SEEDS)).read_text())


def render_lora(lora, out, scales, seeds=SEEDS):
    from loratool import sample

    sample.run(
        sample.SampleConfig(
            output=out, loras=[str(lora)], scales=scales, seeds=seeds, steps=20, model="demo", refiner=None
        )
    )
    return {(seed, s): out / f"seed{seed}_scale{s:.2f}.png" for seed in seeds for s in scales}


def image_tensor(path):
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


def check_slider(summary):
    quality = summary["slider_quality"]
    got = quality["summary"]
    print(summary["config"]["concept"], got)  # the figures, for the record (pytest -s)
    for key, floor in FLOORS.items():
        assert got[key] >= floor, (key, got, quality["per_seed"])
    assert got["mean_glide"] <= MAX_GLIDE[summary["config"]["concept"]], (got, quality["per_seed"])
    assert got["kept"] >= KEPT[summary["config"]["concept"]], (got, quality["per_seed"])
    progress = np.array([row["progress"] for row in quality["per_seed"].values()])  # seeds × scales (sorted)
    assert (progress[:, -1] > progress[:, 0]).all(), progress  # +1 nearer the plus image on every seed


def swept_from_the_start(summary: dict, out) -> dict:
    """The demo's slider swept again as the demo swept it, but with --lora-start 0; its summary."""
    from loratool import sample
    from loratool.demo.run import DemoConfig, measure_sweep

    recorded = summary["config"]
    config = DemoConfig(output=out, concept=recorded["concept"], seeds=SEEDS, pair_seed=recorded["pair_seed"])
    sample.run(
        sample.SampleConfig(
            output=out, loras=[summary["slider"]], prompt=summary["sweep_prompt"], scales=config.scales,
            seeds=SEEDS, steps=config.sample_steps, model="demo", refiner="demo", lora_start=0.0,
        )
    )  # fmt: skip
    pair = (summary["pair_attribute"]["minus"], summary["pair_attribute"]["plus"])
    return measure_sweep(config, out, pair)["summary"]
