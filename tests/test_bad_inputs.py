"""Bad inputs, one row each: exit 1, one line on stderr naming the culprit, no traceback, nothing at the output.

Every row fails before any training or rendering starts, so the table runs in seconds on the tiny models.
"""

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from loratool.lora.io import keymap_for, write_lora
from tests.test_lora_files import random_network


@pytest.fixture(scope="module")
def files(tiny_models, tmp_path_factory):
    """An image, a good kohya LoRA for the tiny base, and damaged copies of it, one per defect."""
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("bad")
    y, x = np.mgrid[0:64, 0:64]
    Image.fromarray(np.stack([x * 4, y * 4, (x + y) * 2], -1).astype(np.uint8)).save(root / "image.png")
    (root / "nan.toml").write_text("alpha = nan\n")
    unet = UNet2DConditionModel.from_pretrained(tiny_models / "base" / "unet")
    good = root / "good.safetensors"
    write_lora(random_network(SimpleNamespace(unet=unet), conv=False, te=False), good, keymap=keymap_for(unet))
    tensors = load_file(good)
    down = next(k for k in tensors if k.endswith("lora_down.weight"))
    alpha = down.replace("lora_down.weight", "alpha")
    damaged = {
        "nan": {down: torch.full_like(tensors[down], float("nan"))},
        "zero_d": {down: torch.tensor(1.0)},
        "huge": {down: tensors[down].clone().index_fill_(1, torch.tensor([0]), 1e20)},
        "int8": {down: tensors[down].to(torch.int8)},
        "nan_alpha": {alpha: torch.tensor(float("nan"))},
        "vector_alpha": {alpha: torch.ones(3)},
    }
    for name, change in damaged.items():
        save_file(tensors | change, root / f"{name}.safetensors")
    return root


def _cases(root, tiny_models):
    base = ["--model", str(tiny_models / "base")]
    train = ["train", str(root / "image.png"), *base, "--steps", "2", "--resolution", "64"]
    sample = ["sample", *base, "--refiner", "none", "--steps", "2"]
    merge = ["merge", *base]
    lora = str(root / "good.safetensors")
    return {
        # train options: every float finite, integers in range, a device torch knows
        "train --alpha inf": ([*train, "--alpha", "inf"], "--alpha"),
        "train --noise-offset nan": ([*train, "--noise-offset", "nan"], "--noise-offset"),
        "train --lr nan": ([*train, "--lr", "nan"], "--lr"),
        "train --min-snr-gamma inf": ([*train, "--min-snr-gamma", "inf"], "--min-snr-gamma"),
        "train --seed 1e23": ([*train, "--seed", str(10**23)], "--seed"),
        "train --seed -1": ([*train, "--seed", "-1"], "--seed"),
        "train --device tpu9": ([*train, "--device", "tpu9"], "--device"),
        "train --base-lora FILE:nan": ([*train, "--base-lora", f"{lora}:nan"], "nan"),
        "train --base-lora NaN file": ([*train, "--base-lora", str(root / "nan.safetensors")], "nan.safetensors"),
        "train --config alpha = nan": ([*train, "--config", str(root / "nan.toml")], "--alpha"),
        # sample options
        "sample --guidance nan": ([*sample, "--guidance", "nan"], "--guidance"),
        "sample --lora-start nan": ([*sample, "--lora-start", "nan"], "--lora-start"),
        "sample --seeds 1e23": ([*sample, "--seeds", "1e23"], "--seeds"),
        "sample --seeds 10**23": ([*sample, "--seeds", str(10**23)], "--seeds"),
        "sample --device tpu9": ([*sample, "--device", "tpu9"], "--device"),
        "sample --points 100000": ([*sample, "--lora", lora, "--points", "100000"], "--points"),
        "sample --lora FILE:inf": ([*sample, "--lora", f"{lora}:inf"], "inf"),
        "sample --lora NaN file": ([*sample, "--lora", str(root / "nan.safetensors")], "nan.safetensors"),
        # merge options and weights
        "merge --alpha 0": ([*merge, lora, "--alpha", "0"], "--alpha"),
        "merge --alpha nan": ([*merge, lora, "--alpha", "nan"], "--alpha"),
        "merge --sv-fro nan": ([*merge, lora, "--sv-fro", "nan"], "--sv-fro"),
        "merge FILE:nan": ([*merge, f"{lora}:nan"], "nan"),
        "merge FILE:abc": ([*merge, f"{lora}:abc"], "abc"),
        "merge a folder as the LoRA": ([*merge, str(root)], "is a folder"),
        "train a LoRA as --model": ([*train[:2], "--model", lora, *train[4:]], "no Stable Diffusion checkpoint"),
        # LoRA tensors: finite, floating point, 2-d or 4-d, in range; alpha one finite number
        "merge NaN factor": ([*merge, str(root / "nan.safetensors")], "nan.safetensors"),
        "merge 0-d factor": ([*merge, str(root / "zero_d.safetensors")], "zero_d.safetensors"),
        "merge 1e20 entry": ([*merge, str(root / "huge.safetensors")], "huge.safetensors"),
        "merge int8 factors": ([*merge, str(root / "int8.safetensors")], "int8.safetensors"),
        "merge NaN alpha": ([*merge, str(root / "nan_alpha.safetensors")], "nan_alpha.safetensors"),
        "merge vector alpha": ([*merge, str(root / "vector_alpha.safetensors")], "vector_alpha.safetensors"),
    }


CASES = [
    *("train --alpha inf", "train --noise-offset nan", "train --lr nan", "train --min-snr-gamma inf"),
    *("train --seed 1e23", "train --seed -1", "train --device tpu9", "train --base-lora FILE:nan"),
    *("train --base-lora NaN file", "train --config alpha = nan", "sample --lora NaN file"),
    *("sample --guidance nan", "sample --lora-start nan", "sample --seeds 1e23", "sample --seeds 10**23"),
    *("sample --device tpu9", "sample --points 100000", "sample --lora FILE:inf"),
    *("merge --alpha 0", "merge --alpha nan", "merge --sv-fro nan", "merge FILE:nan", "merge FILE:abc"),
    *("merge a folder as the LoRA", "train a LoRA as --model"),
    *("merge NaN factor", "merge 0-d factor", "merge 1e20 entry", "merge int8 factors", "merge NaN alpha"),
    "merge vector alpha",
]


def test_the_table_lists_every_case(files, tiny_models):
    assert sorted(CASES) == sorted(_cases(files, tiny_models))


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_naming_the_culprit(case, files, tiny_models, tmp_path, cli):
    args, culprit = _cases(files, tiny_models)[case]
    out = tmp_path / ("samples" if args[0] == "sample" else "out.safetensors")
    code, stdout, stderr = cli(*args, "-o", out)
    assert code == 1, (case, stderr)
    assert stderr.startswith("loratool: error:") and stderr.strip().count("\n") == 0, stderr
    assert culprit in stderr and "Traceback" not in stderr, stderr
    assert not out.exists() and not list(tmp_path.iterdir())


# ---- training: damaged checkpoints under --resume, a diverging loss, Ctrl-C ----------------------------------

TRAIN_FAST = ["--resolution", "64", "--rank", "4", "--lr", "1e-3", "--check-every", "0"]


def _train(files, tiny_models, out, *extra):
    return ["train", files / "image.png", "--model", tiny_models / "base", "-o", out, *TRAIN_FAST, *extra]


@pytest.fixture(scope="module")
def checkpoints(files, tiny_models, tmp_path_factory):
    """`run.ckpt/` with step-000002 and step-000004 (the two kept), from one 4-step run."""
    from typer.testing import CliRunner

    from loratool.cli import app

    out = tmp_path_factory.mktemp("ckpt") / "run.safetensors"
    args = _train(files, tiny_models, out, "--steps", "4", "--save-every", "2")
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.stderr
    folder = out.with_name("run.ckpt")
    assert [p.name for p in sorted(folder.iterdir())] == ["step-000002", "step-000004"]
    return folder


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _state_json(change):
    def damage(path):
        import json

        state = json.loads(path.read_text())
        change(state)
        path.write_text(json.dumps(state))

    return damage


DAMAGE = {  # file in a checkpoint → how it is damaged
    "state.json: not JSON": ("state.json", lambda p: p.write_text("{not json")),
    "state.json: missing key": ("state.json", _state_json(lambda s: s.pop("step"))),
    "state.json: extra key": ("state.json", _state_json(lambda s: s.update(surprise=1))),
    "state.json: missing": ("state.json", lambda p: p.unlink()),
    "lora.safetensors: truncated": ("lora.safetensors", _truncate),
    "lora.safetensors: missing": ("lora.safetensors", lambda p: p.unlink()),
    "optimizer.pt: garbage": ("optimizer.pt", lambda p: p.write_bytes(b"garbage" * 100)),
    "optimizer.pt: truncated": ("optimizer.pt", _truncate),
    "rng.pt: garbage": ("rng.pt", lambda p: p.write_bytes(b"garbage" * 100)),
    "rng.pt: truncated": ("rng.pt", _truncate),
}


def _copy_checkpoints(checkpoints, tmp_path, damaged: tuple[str, ...], case: str):
    folder = tmp_path / "out.ckpt"
    shutil.copytree(checkpoints, folder)
    name, damage = DAMAGE[case]
    for step in damaged:
        damage(folder / step / name)
    return folder, name


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_checkpoint_is_one_line_naming_the_file(case, checkpoints, files, tiny_models, tmp_path, cli):
    folder, name = _copy_checkpoints(checkpoints, tmp_path, ("step-000002", "step-000004"), case)
    out = tmp_path / "out.safetensors"
    code, _, stderr = cli(*_train(files, tiny_models, out, "--steps", "6", "--resume"))
    assert code == 1, (case, stderr)
    assert stderr.startswith("loratool: error:") and stderr.strip().count("\n") == 0, stderr
    assert name in stderr and "step-000004" in stderr and "Traceback" not in stderr, stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out.ckpt"]


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(checkpoints, files, tiny_models, tmp_path, cli):
    _copy_checkpoints(checkpoints, tmp_path, ("step-000004",), "lora.safetensors: truncated")
    out = tmp_path / "out.safetensors"
    code, _, stderr = cli(*_train(files, tiny_models, out, "--steps", "4", "--resume"))
    assert code == 0, stderr
    assert "step-000004/lora.safetensors is damaged" in stderr and "resuming from the older" in stderr
    assert "step-000002" in stderr and out.exists()


def test_resume_without_a_checkpoint_is_an_error_not_a_silent_overwrite(files, tiny_models, tmp_path, cli):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"an earlier LoRA")
    code, _, stderr = cli(*_train(files, tiny_models, out, "--steps", "2", "--resume"))
    assert code == 1 and "--resume: no checkpoint in" in stderr and stderr.strip().count("\n") == 0
    assert out.read_bytes() == b"an earlier LoRA"


def test_a_non_finite_loss_stops_keeps_the_checkpoint_and_writes_no_lora(
    files, tiny_models, tmp_path, cli, monkeypatch
):
    from loratool.train import loop

    real_step, calls = loop.train_step, []

    def nan_at_three(*args, **kwargs):
        calls.append(1)
        return float("nan") if len(calls) == 3 else real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", nan_at_three)
    out = tmp_path / "out.safetensors"
    code, _, stderr = cli(*_train(files, tiny_models, out, "--steps", "4", "--save-every", "2"))
    assert code == 1 and "loss became nan at step 3" in stderr and "step-000002" in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith("loratool: error:") and not out.exists()  # after the bar
    assert [p.name for p in (tmp_path / "out.ckpt").iterdir()] == ["step-000002"]


def test_ctrl_c_finishes_the_step_saves_a_checkpoint_and_resume_matches(files, tiny_models, tmp_path, cli, monkeypatch):
    import os
    import signal

    from loratool.train import loop

    real_step, calls = loop.train_step, []

    def ctrl_c_during_three(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # what a terminal's Ctrl-C does, mid-step
        return real_step(*args, **kwargs)

    straight = tmp_path / "straight.safetensors"
    assert cli(*_train(files, tiny_models, straight, "--steps", "5"))[0] == 0
    monkeypatch.setattr(loop, "train_step", ctrl_c_during_three)
    out = tmp_path / "out.safetensors"
    stale = tmp_path / "out.ckpt" / f".step-000001.tmp-{_dead_pid()}"  # a killed run's half checkpoint
    stale.mkdir(parents=True)
    code, _, stderr = cli(*_train(files, tiny_models, out, "--steps", "5"))  # no --save-every
    assert code == 130 and "interrupted at step 3" in stderr and "--resume continues from step-000003" in stderr
    assert [p.name for p in (tmp_path / "out.ckpt").iterdir()] == ["step-000003"]
    monkeypatch.setattr(loop, "train_step", real_step)
    code, _, stderr = cli(*_train(files, tiny_models, out, "--steps", "5", "--resume"))
    assert code == 0, stderr
    a, b = load_file(straight), load_file(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # as if never stopped


# ---- writes: checked before the work, temp names swept, readable outputs, one writer per output --------------


def _merge(files, tiny_models, out, *extra):
    return ["merge", files / "good.safetensors", "--model", tiny_models / "base", "-o", out, *extra]


def test_a_folder_as_the_output_file_is_refused_even_with_force(files, tiny_models, tmp_path, cli):
    (tmp_path / "out").mkdir()
    code, _, stderr = cli(*_merge(files, tiny_models, tmp_path / "out", "--force"))
    assert code == 1 and "is a folder" in stderr and stderr.strip().count("\n") == 0, stderr
    assert (tmp_path / "out").is_dir() and not list((tmp_path / "out").iterdir())


def test_an_output_under_a_file_is_refused_before_any_work(files, tiny_models, tmp_path, cli):
    (tmp_path / "blocker").write_text("")
    code, _, stderr = cli(*_merge(files, tiny_models, tmp_path / "blocker" / "sub" / "x.safetensors"))
    assert code == 1 and "blocker is not a folder" in stderr and stderr.strip().count("\n") == 0, stderr


def test_an_unwritable_report_fails_before_the_merge_is_written(files, tiny_models, tmp_path, cli):
    (tmp_path / "blocker").write_text("")
    out = tmp_path / "out.safetensors"
    code, _, stderr = cli(*_merge(files, tiny_models, out, "--report", tmp_path / "blocker" / "r.json"))
    assert code == 1 and "blocker is not a folder" in stderr and not out.exists(), stderr


def _dead_pid() -> int:
    import subprocess

    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_stale_temp_files_are_swept_and_outputs_are_readable(files, tiny_models, tmp_path, cli):
    import os

    out = tmp_path / "out.safetensors"
    stale = tmp_path / f".out.safetensors.tmp-{_dead_pid()}"
    stale.write_bytes(b"half a merge")
    theirs = [tmp_path / ".out.safetensors.tmpx1y2z3", tmp_path / f".other.safetensors.tmp-{os.getpid()}"]
    for path in theirs:
        path.write_bytes(b"not ours, or not this output's")
    mask = os.umask(0o022)
    try:
        code, _, stderr = cli(*_merge(files, tiny_models, out))
    finally:
        os.umask(mask)
    assert code == 0, stderr
    assert not stale.exists() and all(p.exists() for p in theirs)
    assert out.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, *(p.name for p in theirs)])  # no lock


def test_a_second_run_to_the_same_output_refuses(files, tiny_models, tmp_path, cli):
    from loratool.files import output_lock

    out = tmp_path / "out.safetensors"
    with output_lock(out):  # another run holds it
        code, _, stderr = cli(*_merge(files, tiny_models, out))
    assert code == 1 and "being written by another loratool run" in stderr and not out.exists(), stderr
    code, _, stderr = cli(*_merge(files, tiny_models, out))
    assert code == 0, stderr


def test_a_write_error_after_training_keeps_the_lora_elsewhere(files, tiny_models, tmp_path, cli, monkeypatch):
    from loratool.errors import LoratoolError
    from loratool.train import loop

    real_write = loop.write_outputs

    def disk_full_at_the_output(config, trainee, state, lora_path, *args, **kwargs):
        if lora_path.parent == tmp_path:
            raise LoratoolError(f"cannot write {lora_path}: No space left on device; free some space.")
        return real_write(config, trainee, state, lora_path, *args, **kwargs)

    monkeypatch.setattr(loop, "write_outputs", disk_full_at_the_output)
    out = tmp_path / "out.safetensors"
    code, _, stderr = cli(*_train(files, tiny_models, out, "--steps", "2"))
    last = stderr.strip().splitlines()[-1]
    assert code == 1 and "No space left" in last and "written to" in last, stderr
    kept = Path(last.rsplit("written to ", 1)[1].removesuffix(" instead."))
    assert kept.name == "out.safetensors" and len(load_file(kept)) > 0 and not out.exists()
    shutil.rmtree(kept.parent)


KILLED = {  # what a run was writing when kill -9 came: (target, body of its atomic_path block)
    "file": ("out.safetensors", "tmp.write_bytes(b'x' * 4096)"),
    "checkpoint folder": ("run.ckpt/step-000004", "tmp.mkdir(); (tmp / 'lora.safetensors').write_bytes(b'x')"),
}


@pytest.mark.parametrize("kind", list(KILLED))
def test_kill_9_mid_write_leaves_a_temp_that_the_next_write_removes(kind, tmp_path):
    import subprocess
    import sys

    from loratool.files import atomic_path, sweep

    name, body = KILLED[kind]
    target = tmp_path / name
    script = f"import os\nfrom loratool.files import atomic_path\nwith atomic_path({str(target)!r}) as tmp:\n"
    script += f"    {body}\n    os.kill(os.getpid(), 9)\n"
    env = {"PYTHONPATH": str(Path(__file__).parents[1])}
    assert subprocess.run([sys.executable, "-c", script], env=env).returncode == -9
    left = [p.name for p in target.parent.iterdir()]
    assert len(left) == 1 and left[0].startswith(f".{target.name}.tmp-") and not target.exists()
    if kind == "file":  # the next write to the same output removes it
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"done")
        assert [p.name for p in target.parent.iterdir()] == [target.name]
    else:  # the next checkpoint sweeps every step's temp name (checkpoint.save calls this)
        sweep(target.parent, ".step-*.tmp-*")
        assert not list(target.parent.iterdir())
