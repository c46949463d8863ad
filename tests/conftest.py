"""Shared fixtures: tiny random pipelines (saved and reloaded), the real face photo."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

# One intra-op thread per process: tiny models are dominated by per-call overhead, and on a
# loaded 2-core machine they run 5-10x slower with two threads than with one. pytest-xdist
# (`-n auto` in pyproject.toml) runs one worker process per core instead. Subprocesses that
# tests start (the demo server, SIGTERM checks) inherit the setting through the environment.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def astronaut() -> Image.Image:
    """A real face photograph: scikit-image's astronaut (Eileen Collins, NASA, public domain)."""
    from skimage import data

    return Image.fromarray(data.astronaut())


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory):
    from freecure.families.tiny import tiny_sd15_pipeline

    pipe = tiny_sd15_pipeline(tmp_path_factory.mktemp("tiny-sd15"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    from freecure.families.tiny import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def grey_image() -> Image.Image:
    return Image.fromarray(np.full((64, 64, 3), 128, np.uint8))


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    from freecure.families.tiny import tiny_flux_pipeline

    pipe = tiny_flux_pipeline(tmp_path_factory.mktemp("tiny-flux"))
    pipe.set_progress_bar_config(disable=True)
    return pipe
