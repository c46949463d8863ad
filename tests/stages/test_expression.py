"""DDIM inversion then denoising (§4.2) on a closed-form denoiser where it is exact."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from freecure.core.conditioning import TextConditioning
from freecure.core.configs import SD_SCHEDULER
from freecure.stages.expression import (
    ddim_denoise_from,
    ddim_invert,
    expression_restore,
    inversion_steps,
    reconstruction_error,
)

SIZE = (64, 64)


class ConstantNoiseBackend:
    """ε(z, t, c) = a fixed field that depends on the conditioning only (not on z or t):
    for such a model DDIM inversion is exact, so inversion followed by denoising with the
    same prompt must return the input up to float error."""

    def __init__(self):
        self.calls = []

    def predict_noise(self, latents, timestep, rows, row_keys, step_index, image_size):
        self.calls.append((int(timestep), tuple(row_keys)))
        fields = []
        for row in rows:
            seed = int(row.prompt_embeds.sum().item() * 1000) % 10_000
            fields.append(torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(seed)))
        return torch.stack(fields).to(latents)


def conditioning(value: float) -> TextConditioning:
    return TextConditioning(torch.full((1, 4, 8), value))


@pytest.fixture
def config():
    return DDIMScheduler(**SD_SCHEDULER).config


@pytest.mark.parametrize("gamma", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_inversion_then_denoising_reconstructs_on_a_constant_denoiser(config, gamma, guidance):
    backend = ConstantNoiseBackend()
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    error = reconstruction_error(backend, z0, conditioning(0.1), conditioning(0.0), config, 20, gamma, guidance, SIZE)
    assert error < 1e-6
    n = inversion_steps(20, gamma)
    assert len(backend.calls) == 2 * n


def test_inversion_reaches_the_timestep_denoising_starts_from(config):
    backend = ConstantNoiseBackend()
    z0 = torch.zeros(1, 4, 8, 8, dtype=torch.float64)
    ddim_invert(backend, z0, conditioning(0.1), conditioning(0.0), config, 10, 0.5, 1.0, SIZE)
    inverted_timesteps = [t for t, _ in backend.calls]
    backend.calls.clear()
    ddim_denoise_from(backend, z0, conditioning(0.1), conditioning(0.0), config, 10, 0.5, 1.0, SIZE)
    denoised_timesteps = [t for t, _ in backend.calls]
    assert len(inverted_timesteps) == len(denoised_timesteps) == 5
    # the denoising timesteps are the inversion's, walked back down
    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(10)
    assert denoised_timesteps == [int(t) for t in scheduler.timesteps[5:]]


def test_another_prompt_changes_the_result(config):
    # the negative control: the same machinery with a different denoising prompt does not
    # reconstruct, so the reconstruction test above can fail
    backend = ConstantNoiseBackend()
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = expression_restore(
        backend, z0, conditioning(0.1), conditioning(0.3), conditioning(0.0), config, 20, 0.5, 1.0, SIZE
    )
    assert (out - z0).norm() / z0.norm() > 1e-2


def test_guidance_rows(config):
    backend = ConstantNoiseBackend()
    z0 = torch.zeros(1, 4, 8, 8)
    ddim_invert(backend, z0, conditioning(0.1), conditioning(0.0), config, 4, 0.5, 1.0, SIZE)
    assert all(keys == ("cond",) for _, keys in backend.calls)
    backend.calls.clear()
    ddim_invert(backend, z0, conditioning(0.1), conditioning(0.0), config, 4, 0.5, 3.0, SIZE)
    assert all(keys == ("uncond", "cond") for _, keys in backend.calls)


@pytest.mark.parametrize("gamma", [0.0, -0.1, 1.01])
def test_gamma_outside_unit_interval_is_refused(gamma):
    with pytest.raises(ValueError, match="gamma"):
        inversion_steps(50, gamma)


def test_inversion_step_count():
    assert inversion_steps(50, 0.5) == 25
    assert inversion_steps(50, 1.0) == 50
    assert inversion_steps(3, 0.1) == 1


# --- precision: fp32 lanes under a half-precision model ------------------------------------
class HalfPrecisionConstantBackend(ConstantNoiseBackend):
    """The constant-field denoiser run "in" ``dtype``: its inputs must arrive in that dtype and its
    field is rounded to it, as a half-precision UNet's output would be."""

    def __init__(self, dtype):
        super().__init__()
        self.dtype = dtype
        self.input_dtypes = set()

    def predict_noise(self, latents, timestep, rows, row_keys, step_index, image_size):
        self.input_dtypes.add(latents.dtype)
        return super().predict_noise(latents, timestep, rows, row_keys, step_index, image_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gamma", [0.5, 1.0])
def test_round_trip_stays_exact_in_every_model_dtype(config, dtype, gamma):
    backend = HalfPrecisionConstantBackend(dtype)
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))  # fp32 lanes
    error = reconstruction_error(backend, z0, conditioning(0.1), conditioning(0.0), config, 20, gamma, 1.0, SIZE)
    assert backend.input_dtypes == {dtype}
    assert error < 1e-5
    if dtype != torch.float32:
        # the negative control: stepping the lanes in the model's dtype drifts (the old behaviour)
        drift = reconstruction_error(
            backend, z0.to(dtype), conditioning(0.1), conditioning(0.0), config, 20, gamma, 1.0, SIZE
        )
        assert drift > 100 * max(error, 1e-7)
