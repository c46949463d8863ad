"""Devices, dtypes, schedulers and base-pipeline loading shared by the CLI and backends."""

from __future__ import annotations

import logging

import torch

from .errors import InputError

logger = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

#: ``--scheduler`` names → diffusers scheduler classes and extra config.
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "dpmpp-2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    # PuLID SDXL v1.1's non-Lightning preset (k-diffusion's DPM++ 2M on Karras sigmas)
    "dpmpp-2m-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "flow-euler": ("FlowMatchEulerDiscreteScheduler", {}),
}


def resolve_device(device: str | None) -> torch.device:
    """``device`` as given, else CUDA when available, else CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """``dtype`` by name, else float16 on CUDA and float32 elsewhere."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise InputError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}") from None


def set_scheduler(pipeline, name: str) -> None:
    """Replace the pipeline's scheduler by ``name`` (see :data:`SCHEDULERS`), same config."""
    import diffusers

    if name not in SCHEDULERS:
        raise InputError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    class_name, extra = SCHEDULERS[name]
    scheduler_cls = getattr(diffusers, class_name)
    pipeline.scheduler = scheduler_cls.from_config(pipeline.scheduler.config, **extra)


def load_base_pipeline(model: str, device: torch.device, dtype: torch.dtype, sdxl: bool | None = None, **kwargs):
    """Load a diffusers text-to-image pipeline (SD1.5 or SDXL family) from the Hub or a folder.

    Args:
        model: Hub id (``"stable-diffusion-v1-5/stable-diffusion-v1-5"``) or local folder.
        sdxl: force the family; None lets diffusers read it from the model's index.
        kwargs: passed to ``from_pretrained`` (``variant``, ``revision``, components …).
    """
    from diffusers import (
        AutoPipelineForText2Image,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    cls = {None: AutoPipelineForText2Image, True: StableDiffusionXLPipeline, False: StableDiffusionPipeline}[sdxl]
    extra = {} if sdxl is not False else {"safety_checker": None, "requires_safety_checker": False}
    try:
        pipeline = cls.from_pretrained(model, torch_dtype=dtype, **extra, **kwargs)
    except (OSError, ValueError) as error:
        raise InputError(
            f"could not load the base model {model!r}: {error}\n"
            "Give a Hugging Face Hub id (network access and, for gated models, `hf auth login` "
            "needed) or a local folder saved with save_pretrained. Offline, try --tiny."
        ) from None
    return pipeline.to(device)
