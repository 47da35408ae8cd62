"""Shared fixtures: one torch thread, offline hub, and the tiny SDXL models built once per session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from loratool import libraries  # noqa: E402

# As the CLI does before anything imports diffusers: every test process then agrees on whether bitsandbytes
# exists (diffusers checks once, at import), whichever test runs first.
libraries.without_bitsandbytes()

torch.set_num_threads(1)  # with two threads a busy neighbour slows torch 10-100x


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Folders `base` and `refiner` plus single-file `base.safetensors` / `refiner.safetensors`."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    from loratool.sdxl.checkpoint import save_single_file
    from loratool.sdxl.tiny import save_tiny

    root = tmp_path_factory.mktemp("tiny")
    base_dir, refiner_dir = save_tiny(root)
    save_single_file(StableDiffusionXLPipeline.from_pretrained(base_dir), root / "base.safetensors")
    save_single_file(StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_dir), root / "refiner.safetensors")
    return root


@pytest.fixture
def cli():
    """Invoke the Typer app in-process; returns (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from loratool.cli import app

    runner = CliRunner()

    def invoke(*args: str):
        result = runner.invoke(app, [str(a) for a in args])
        return result.exit_code, result.stdout, result.stderr

    return invoke


@pytest.fixture(autouse=True)
def _drop_cli_log_handlers():
    """The CLI points the root logger at CliRunner's stderr, which is closed once the command returns; later
    library calls in the same process would log into a closed file."""
    yield
    import logging

    logging.getLogger().handlers.clear()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """Under `--dist loadfile` (pyproject's addopts) each test file runs on one worker, so its module-scoped
    fixtures (trained LoRAs, demo runs) are made once. The files with minutes-long runs (marked slow) are handed
    out first and the quick ones fill in after, so the two workers finish together. Not `--dist loadgroup`:
    with pytest 9.2 it silently ignores xdist_group (pytest-xdist#1386), which split files across the workers
    and made the colour and size demo runs twice."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order kept otherwise
