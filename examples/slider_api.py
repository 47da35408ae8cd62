"""The slider of `slider_demo.sh` through the Python API: train.run, merge.run, sample.run with their configs.

    python examples/slider_api.py [OUT]            # STEPS=20 SAMPLE_STEPS=4 for a quick look

Each config is the same dataclass the CLI fills from its flags, and what the outputs record.
"""

import os
import sys
from pathlib import Path

from loratool import libraries, merge, sample, train
from loratool.demo.shapes import concept_pair


def main(out: Path, steps: int, sample_steps: int) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    minus, plus, _, _ = concept_pair("size", 0)  # one scene, the shape large (plus) and small (minus)
    plus.save(out / "plus.png")
    minus.save(out / "minus.png")
    copies = train.TrainConfig(  # a pair: both images, identical settings → size_a, size_b (+ their reports)
        images=[out / "plus.png", out / "minus.png"],
        pair=True,
        output=out / "size",
        model="demo",
        resolution=128,
        rank=8,
        alpha=8.0,
        steps=steps,  # copy mode's defaults: lr 1e-3, noise offset 0.2, a quarter of the steps from pure noise
        check_every=0,
        force=True,
    )
    train.run(copies)
    a, b = copies.lora_paths()
    slider = merge.run(
        merge.MergeConfig(
            inputs=[(a, 1.0), (b, -1.0)], output=out / "size_slider.safetensors", model="demo", force=True
        )
    )
    return sample.run(
        sample.SampleConfig(
            output=out / "sweep",
            loras=[str(slider)],
            scales=[-1.0, -0.5, 0.0, 0.5, 1.0],
            seeds=[0, 1],
            steps=sample_steps,
            prompt="a blue triangle on the left",
            lora_start=0.0,  # from the first step: started later, a size slider hardly moves some shapes
            model="demo",
            refiner="demo",
            force=True,
        )
    )


if __name__ == "__main__":
    libraries.quiet()  # as the CLI does: no other library's warnings on stderr (bitsandbytes kept out)
    written = main(
        Path(sys.argv[1] if len(sys.argv) > 1 else "slider-api"),
        steps=int(os.environ.get("STEPS", 300)),
        sample_steps=int(os.environ.get("SAMPLE_STEPS", 20)),
    )
    print("\n".join(map(str, written)))
