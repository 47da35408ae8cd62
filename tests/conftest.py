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
    """Under `--dist loadgroup` (pyproject's addopts) a test without an xdist_group runs on its module's
    worker, so module-scoped fixtures (trained LoRAs, built models) are made once; test_demo_quality splits
    its minutes-long runs into groups of their own so the two workers share them."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
