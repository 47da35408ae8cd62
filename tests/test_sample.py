"""Slider sweeps on the tiny base + refiner: exactness against plain renders and direct adapters, outputs, errors."""

import json
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loratool.sample.scales import scale_labels, slider_scales, value_scales
from loratool.sdxl.index import parse_spec
from tests.test_lora_files import random_network

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def loras(tiny_models, tmp_path_factory):
    """Two random LoRA files for the tiny base (one with text-encoder parts), one whose up weights are all zero
    (no effect at any scale) and one for another base."""
    from diffusers import StableDiffusionXLPipeline

    from loratool.lora.io import keymap_for, write_lora
    from loratool.lora.network import LoraModule

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models / "base")
    root = tmp_path_factory.mktemp("loras")
    keymap = keymap_for(pipe.unet)
    write_lora(random_network(pipe, seed=1), root / "a.safetensors", keymap=keymap)
    write_lora(random_network(pipe, seed=2, te=False), root / "b.safetensors", keymap=keymap)
    zero = random_network(pipe, seed=4, te=False)
    for m in zero:
        m.up.zero_()
    write_lora(zero, root / "zero.safetensors", keymap=keymap)
    wrong = random_network(pipe, seed=3, te=False)
    m = next(iter(wrong))  # same names, a wider layer: a LoRA made for another base
    wrong.add(LoraModule(m.component, m.path, torch.zeros(2, m.down.shape[1] * 2, *m.down.shape[2:]), m.up, 2.0))
    write_lora(wrong, root / "wrong.safetensors", keymap=keymap)
    return root


def _sweep(tiny, loras: list[str], scales, **kw):
    """The library path (read, check, inject, switch, render) with float outputs: {(seed, scale): HxWx3}."""
    from loratool import sample
    from loratool.sample.sweep import make_prompt, render_sweep
    from loratool.sdxl.adapters import Adapters, read_loras
    from loratool.sdxl.models import pick_runtime

    config = sample.SampleConfig(
        prompt=PROMPT, steps=4, model=str(tiny / "base"), refiner="none", loras=loras, scales=scales, **kw
    )
    base, _ = sample._load(config, pick_runtime("cpu"))
    swept = config.swept_index()
    adapters = Adapters(base, read_loras(base, [parse_spec(s) for s in loras], swept), mode=config.switch)
    return render_sweep(base, None, config, adapters, make_prompt(config), None, swept, output_type="np")


def _direct(tiny, files_weights: list[tuple[Path, float]], seed=0, **kw):
    """Reference: a fresh pipeline, each file injected as a peft adapter, weights set with set_adapters."""
    from diffusers import StableDiffusionXLPipeline

    from loratool.sdxl.adapters import Adapters, read_loras

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny / "base")
    pipe.set_progress_bar_config(disable=True)
    if files_weights:
        loaded = read_loras(pipe, [(f, 1.0) for f, _ in files_weights], swept=0)
        Adapters(pipe, loaded, mode="adapters").set([w for _, w in files_weights])
    generator = torch.Generator("cpu").manual_seed(seed)
    out = pipe(PROMPT, negative_prompt="", num_inference_steps=4, generator=generator, output_type="np", **kw)
    return out.images[0]


def test_scale_zero_is_the_plain_model_and_scale_s_is_the_adapter_at_s(tiny_models, loras):
    images = _sweep(tiny_models, [str(loras / "a.safetensors")], [-1.0, 0.5, 1.0])
    plain = _direct(tiny_models, [])
    assert np.abs(images[(0, 0.0)] - plain).max() <= 1e-4
    assert np.abs(images[(0, 1.0)] - plain).mean() > 1e-3
    assert np.abs(images[(0, -1.0)] - plain).mean() > 1e-3
    direct = _direct(tiny_models, [(loras / "a.safetensors", 0.5)])
    assert np.abs(images[(0, 0.5)] - direct).max() <= 1e-4


def test_unfused_and_fused_adapters_give_the_same_images(tiny_models, loras):
    unfused = _sweep(tiny_models, [str(loras / "a.safetensors")], [0.5], switch="adapters")
    fused = _sweep(tiny_models, [str(loras / "a.safetensors")], [0.5], switch="fuse")
    direct = _direct(tiny_models, [(loras / "a.safetensors", 0.5)])
    assert np.abs(unfused[(0, 0.5)] - direct).max() <= 1e-4
    assert np.abs(fused[(0, 0.5)] - direct).max() <= 1e-4


def test_two_adapters_opposite_weights(tiny_models, loras):
    """Slider as A(+s)/B(-s): A swept at s=0.5, B fixed at -0.5, equals both adapters set directly."""
    specs = [str(loras / "a.safetensors"), f"{loras / 'b.safetensors'}:-0.5"]
    images = _sweep(tiny_models, specs, [0.5], sweep="a.safetensors")
    direct = _direct(tiny_models, [(loras / "a.safetensors", 0.5), (loras / "b.safetensors", -0.5)])
    assert np.abs(images[(0, 0.5)] - direct).max() <= 1e-4


def _run(cli, tiny, out, *args):
    code, stdout, stderr = cli("sample", "--prompt", PROMPT, "--steps", "4", "-o", out, "--model", tiny / "base", *args)
    assert code == 0, stderr
    return stdout, stderr


def test_cli_sweep_writes_images_sheet_animation_and_report(cli, tiny_models, loras, tmp_path):
    _run(cli, tiny_models, tmp_path / "plain", "--seed", "0", "--refiner", tiny_models / "refiner")
    out = tmp_path / "sweep"
    lora = loras / "a.safetensors"
    _, err = _run(
        cli, tiny_models, out, "--lora", lora, "--slider", "-1..1", "--points", "4", "--seeds", "0,1",
        "--refiner", tiny_models / "refiner",
    )  # fmt: skip
    scales = [-1.0, -1 / 3, 0.0, 1 / 3, 1.0]  # 4 points miss 0: it is inserted
    labels = ["-1.00", "-0.33", "0.00", "0.33", "1.00"]
    plain = np.asarray(Image.open(tmp_path / "plain" / "seed0.png"), dtype=np.float32) / 255
    zero = np.asarray(Image.open(out / "seed0_scale0.00.png"), dtype=np.float32) / 255
    assert np.abs(zero - plain).max() <= 1e-4
    one = Image.open(out / "seed1_scale1.00.png")
    assert "Seed: 1" in one.text["parameters"] and "a: " in one.text["parameters"]
    record = json.loads(one.text["loratool"])
    assert record["scale"] == 1.0 and record["lora_weights"][0]["sha256"] and record["lora_weights"][0]["swept"]
    sheet = Image.open(out / "sheet.png")
    assert sheet.width > 5 * 64 and sheet.height > 2 * 64 and sheet.width < 5 * 64 + 200
    gif = Image.open(out / "sweep-seed0.gif")
    assert gif.n_frames in (len(scales), 2 * len(scales) - 2)
    report = json.loads((out / "sweep.json").read_text())
    assert report["refiner"]["refiner_loras"] == [] and report["refiner"]["base_steps"] == 3
    assert list(report["metrics"]["0"]["mean_abs_change"]) == labels
    assert report["metrics"]["0"]["mean_abs_change"]["0.00"] == 0.0
    assert -1.0 <= report["metrics"]["1"]["spearman_abs_scale_vs_change"] <= 1.0
    assert list(report["metrics"]["1"]["neighbour_change"]) == [f"{a}..{b}" for a, b in pairwise(labels)]
    assert set(report["metrics"]["1"]["change_grows"]) == {"negative", "positive"}
    assert report["summary"]["seeds"] == 2 and report["summary"]["even_glide"] == 0.25
    assert "spearman" in err and len([line for line in err.splitlines() if line.startswith("slider: ")]) == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"seed{s}_scale{x}.png" for s in (0, 1) for x in labels]
        + ["sheet.png", "sweep.json", "sweep-seed0.gif", "sweep-seed1.gif"]
    )


def test_cli_options_run(cli, tiny_models, loras, tmp_path):
    """--refiner none, --lora-start, a fixed extra LoRA, two seeds, micro-conditioning and a scheduler."""
    _run(
        cli, tiny_models, tmp_path / "o", "--refiner", "none", "--lora", loras / "a.safetensors",
        "--lora", f"{loras / 'b.safetensors'}:0.7", "--sweep", "a", "--values", "-2,2", "--lora-start", "0.5",
        "--seeds", "3,4", "--original-size", "128x96", "--crop", "8,0", "--target-size", "64x64",
        "--scheduler", "dpm++2m", "--prompt-2", "blue", "--negative-prompt-2", "green",
    )  # fmt: skip
    report = json.loads((tmp_path / "o" / "sweep.json").read_text())
    assert report["refiner"]["refiner"] is None and report["lora_start"]["base_steps_off"] == 2
    assert report["files"]["references"] == {"3": "seed3_scale0.00.png", "4": "seed4_scale0.00.png"}
    assert [x["weight"] for x in report["loras"]] == [1.0, 0.7]


def test_lora_start_changes_the_image(tiny_models, loras):
    lora = [str(loras / "a.safetensors")]
    late = _sweep(tiny_models, lora, [1.0], lora_start=0.5)
    full = _sweep(tiny_models, lora, [1.0])[(0, 1.0)]
    never = _sweep(tiny_models, lora, [1.0], lora_start=1.0)[(0, 1.0)]
    plain, late = late[(0, 0.0)], late[(0, 1.0)]
    assert np.abs(never - plain).max() <= 1e-4  # off for every base step: the plain model
    assert np.abs(late - full).mean() > 1e-4 and np.abs(late - plain).mean() > 1e-4


def test_guidance_rescale_is_diffusers_own_and_is_recorded(cli, tiny_models, loras, tmp_path):
    """--guidance-rescale is diffusers' guidance_rescale (Lin et al.'s CFG rescale φ), on every render of a sweep,
    and each PNG says so the way A1111 and Forge read it back."""
    rescaled = _sweep(tiny_models, [str(loras / "a.safetensors")], [1.0], guidance_rescale=0.7)[(0, 0.0)]
    assert np.abs(rescaled - _direct(tiny_models, [], guidance_rescale=0.7)).max() <= 1e-4
    assert np.abs(rescaled - _direct(tiny_models, [])).mean() > 1e-4  # it does change the render
    _run(cli, tiny_models, tmp_path / "o", "--refiner", tiny_models / "refiner", "--guidance-rescale", "0.7")
    assert "CFG Rescale phi: 0.7" in Image.open(tmp_path / "o" / "seed0.png").text["parameters"]
    _run(cli, tiny_models, tmp_path / "off", "--refiner", "none")
    assert "CFG Rescale" not in Image.open(tmp_path / "off" / "seed0.png").text["parameters"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--guidance-rescale", "1.5"], "--guidance-rescale"),
        (["--slider", "1..-1"], "--slider"),
        (["--points", "0"], "--points"),
        (["--scheduler", "heun"], "--scheduler"),
        (["--lora-start", "1.5"], "--lora-start"),
        (["--cpu-offload", "--device", "cpu"], "--cpu-offload"),
        (["--refiner-frac", "0.3", "--high-noise-frac", "0.5"], "--refiner-frac"),
        (["--sweep", "nope"], "--sweep"),
    ],
)
def test_bad_options_fail_in_one_line(cli, tiny_models, loras, tmp_path, args, message):
    _fails(cli, tiny_models, tmp_path, message, "--lora", loras / "a.safetensors", *args)


def test_lora_for_another_base_fails_before_rendering(cli, tiny_models, loras, tmp_path):
    _fails(cli, tiny_models, tmp_path, "another base model", "--lora", loras / "wrong.safetensors")


def _fails(cli, tiny, tmp_path, message, *args):
    out = tmp_path / "o"
    code, stdout, err = cli("sample", "--steps", "2", "-o", out, "--model", tiny / "base", "--refiner", "none", *args)
    assert code == 1, (stdout, err)
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_a_scale_that_breaks_the_model_fails_naming_it_and_writes_nothing(cli, tiny_models, loras, tmp_path):
    """NaN renders are refused: not written as black images, with numpy's cast warning on stderr."""
    out = tmp_path / "o"
    args = ["--lora", loras / "b.safetensors", "--values", "100000", "--seeds", "0", "--refiner", "none"]
    code, _, err = cli("sample", "--steps", "2", "-o", out, "--model", tiny_models / "base", *args)
    assert code == 1 and "At scale 100000, seed 0 rendered NaN or infinite pixels" in err, err
    assert "Traceback" not in err and "invalid value" not in err and "Warning" not in err, err
    assert not out.exists() or not any(out.iterdir())


def test_existing_sweep_needs_force(cli, tiny_models, loras, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "sheet.png").write_bytes(b"keep")
    code, _, err = cli(
        "sample", "-o", tmp_path / "o", "--model", tiny_models / "base", "--lora", loras / "a.safetensors"
    )
    assert code == 1 and "--force" in err
    assert (tmp_path / "o" / "sheet.png").read_bytes() == b"keep"
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["sheet.png"]


@pytest.mark.parametrize(
    "text,points,expected",
    [
        ("-1..1", 5, [-1.0, -0.5, 0.0, 0.5, 1.0]),
        ("-1..1", 2, [-1.0, 0.0, 1.0]),
        ("-2..1", 4, [-2.0, -1.0, 0.0, 1.0]),
        ("-1..2", 2, [-1.0, 0.0, 2.0]),
        ("0.5..1", 2, [0.5, 1.0]),
        ("0..1", 3, [0.0, 0.5, 1.0]),
    ],
)
def test_slider_scales(text, points, expected):
    assert slider_scales(text, points) == pytest.approx(expected)


def test_values_and_labels():
    assert value_scales("0, -2,2") == [0.0, -2.0, 2.0]
    assert scale_labels([-1.0, 0.0, 1.0]) == ["-1.00", "0.00", "1.00"]
    assert scale_labels([0.001, 0.004]) == ["0.001", "0.004"]
    assert parse_spec("x.safetensors:-0.5") == (Path("x.safetensors"), -0.5)
    assert parse_spec("C:/loras/x.safetensors") == (Path("C:/loras/x.safetensors"), 1.0)


def _imports(root: Path) -> dict[str, set[str]]:
    """loratool module → the loratool modules it imports anywhere in its body (function-level imports too)."""
    import ast

    modules = {
        ".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
        for p in root.rglob("*.py")
    }
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= {
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                    for a in node.names
                }
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_sampling_takes_part_in_no_import_circle():
    """Issue 17: slider.py and sample.py imported each other; the sample package has one floor per module."""
    import loratool

    graph = _imports(Path(loratool.__file__).parent)
    ours = {m for m in graph if m.startswith("loratool.sample") or m == "loratool.metrics"}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                if nxt == goal:
                    return True
                seen.add(nxt)
                todo.append(nxt)
        return False

    assert [m for m in ours if reaches(m, m)] == []
    climbs = [m for m in ours - {"loratool.sample"} if "loratool.sample" in graph[m]]
    assert climbs == [], "a module of the package imports the package itself"


def test_importing_the_sample_package_does_not_load_torch():
    """Flags are checked (SampleConfig) before any heavy import, so a bad flag fails instantly."""
    import subprocess
    import sys

    probe = "import sys, loratool.sample; print([m for m in ('torch', 'diffusers') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_lora_whose_effect_grows_with_scale_glides_evenly(cli, tiny_models, loras, tmp_path):
    """Issue 12: a small random LoRA changes the render more the further its scale is from 0, in even steps."""
    out = tmp_path / "o"
    _, err = _run(cli, tiny_models, out, "--lora", loras / "b.safetensors", "--seeds", "0,1", "--refiner", "none")
    report = json.loads((out / "sweep.json").read_text())
    for m in report["metrics"].values():
        assert m["mean_abs_change"]["0.00"] == 0.0 and min(m["neighbour_change"].values()) > 0
        assert m["change_grows"] == {"negative": True, "positive": True}
        assert 0.25 <= m["glide"] < 0.35, m  # 0.25 is even; a switch would be near 1
    summary = report["summary"]
    assert summary["change_grows_on_seeds"] == {"negative": 2, "positive": 2, "all_sides": 2}
    assert 0.25 <= summary["mean_glide"] < 0.35 and summary["mean_spearman_abs_scale_vs_change"] > 0.9
    assert "change grows with |scale| on both sides on 2/2 seeds" in err


def test_a_lora_without_effect_has_no_change_and_no_glide(cli, tiny_models, loras, tmp_path):
    out = tmp_path / "o"
    _, err = _run(cli, tiny_models, out, "--lora", loras / "zero.safetensors", "--points", "3", "--refiner", "none")
    text = (out / "sweep.json").read_text()
    assert "NaN" not in text
    m, summary = json.loads(text)["metrics"]["0"], json.loads(text)["summary"]
    assert set(m["mean_abs_change"].values()) == {0.0} and set(m["neighbour_change"].values()) == {0.0}
    assert m["glide"] is None and m["spearman_abs_scale_vs_change"] is None
    assert m["change_grows"] == {"negative": False, "positive": False}
    assert summary["mean_glide"] is None and summary["change_grows_on_seeds"]["all_sides"] == 0
    assert "slider: mean glide n/a" in err


def test_the_summary_line_says_why_a_sweep_has_no_glide():
    from loratool.sample.quality import measure, summarise, summary_line

    flat = {(0, s): np.zeros((2, 2, 3), np.uint8) for s in (0.0, 1.0)}
    assert "mean glide n/a (one scale swept)" in summary_line(summarise([1.0], measure([1.0], [0], flat)))
    flat |= {(0, -1.0): np.zeros((2, 2, 3), np.uint8)}
    line = summary_line(summarise([-1.0, 1.0], measure([-1.0, 1.0], [0], flat)))
    assert "mean glide n/a (no change between neighbouring scales)" in line


def test_slider_metrics_of_a_one_sided_sweep():
    """Scales 0..1 have no negative side: its growth is None (not False) and the summary line names one side."""
    from loratool.sample.quality import seed_metrics, summarise, summary_line

    scales = [0.0, 0.5, 1.0]
    m = seed_metrics(scales, [0.0, 0.1, 0.4], jumps=[0.1, 0.3])
    assert m["change_grows"] == {"negative": None, "positive": True}
    assert m["glide"] == pytest.approx(0.75) and m["neighbour_change"] == {"0.00..0.50": 0.1, "0.50..1.00": 0.3}
    switch = seed_metrics(scales, [0.0, 0.4, 0.4], jumps=[0.4, 0.0])
    summary = summarise(scales, {"0": m, "1": switch})
    assert summary["change_grows_on_seeds"] == {"positive": 2, "all_sides": 2}
    assert summary["mean_glide"] == pytest.approx(0.875) and summary["even_glide"] == 0.5
    assert summary_line(summary) == (
        "slider: mean glide 0.88 (even = 0.50), change grows with |scale| on the positive side on 2/2 seeds, "
        "Spearman 0.93"  # (1 + 0.87) / 2: the switch's |scale| 0.5 and 1 tie on change
    )
