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


#: ``--offload`` choices: diffusers' CPU offload hooks.
OFFLOAD_MODES = ("none", "model", "sequential")


def apply_memory_options(
    pipeline,
    device: torch.device,
    offload: str = "none",
    vae_tiling: bool = False,
    vae_slicing: bool = False,
) -> None:
    """Offload and VAE memory savers on a loaded diffusers pipeline.

    ``offload="model"``: :meth:`~diffusers.DiffusionPipeline.enable_model_cpu_offload` (one
    whole model on ``device`` at a time); ``"sequential"``:
    :meth:`~diffusers.DiffusionPipeline.enable_sequential_cpu_offload` (each layer's weights
    moved in for its forward). FreeCure's attention processors are installed inside the
    denoiser and call its own (hooked) projections, so they work under both. ``vae_tiling``
    decodes large images tile by tile, ``vae_slicing`` one image at a time.

    Raises:
        InputError: an unknown mode, or sequential offload without an accelerator (accelerate
            cannot stream weights to a CPU execution device).
    """
    if offload not in OFFLOAD_MODES:
        raise InputError(f"unknown offload mode {offload!r}; choose one of {', '.join(OFFLOAD_MODES)}")
    if offload == "sequential" and device.type == "cpu":
        raise InputError("--offload sequential needs a GPU (accelerate cannot stream weights to the CPU); use model")
    if offload == "model":
        pipeline.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipeline.enable_sequential_cpu_offload(device=device)
    vae = getattr(pipeline, "vae", None)
    if vae_tiling and vae is not None:
        vae.enable_tiling()
    if vae_slicing and vae is not None:
        vae.enable_slicing()
    if offload != "none":
        logger.info("CPU offload %s: models live on the CPU and move to %s for their forward", offload, device)


def compile_denoiser(denoiser: torch.nn.Module, mode: str | None = None, backend: str = "inductor") -> None:
    """``torch.compile`` the denoiser's forward in place, with static shapes (``dynamic=False``).

    FreeCure's stages call the denoiser with a few fixed batch sizes (for n images: the SAME
    pass 2n rows before injection and 4n after, ROFA 2n, expression n or 2n), so each stage
    compiles once and then reuses its graph. Hooks on the module (FreeCure's call counter)
    stay outside the compiled function, and the attention-capture processor is installed only
    on the layers it records, so the other layers keep the processors they compile with. The
    dynamo cache is raised to hold every stage's graph (:data:`COMPILE_CACHE_SIZE`).

    Args:
        mode: ``torch.compile`` mode, one of :func:`compile_modes`, e.g. ``"reduce-overhead"``
            (CUDA graphs) on a GPU.
        backend: the compiler backend (tests use a counting one).

    Raises:
        InputError: ``mode`` is not a mode of this torch (torch.compile itself would fail only
            at the first call, after every model loaded).
    """
    import torch._dynamo

    if mode is not None and mode not in compile_modes():
        raise InputError(f"unknown torch.compile mode {mode!r}; choose one of {', '.join(compile_modes())}")
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, COMPILE_CACHE_SIZE)
    denoiser.forward = torch.compile(denoiser.forward, dynamic=False, mode=mode, backend=backend)


#: Graphs a compiled denoiser may hold: 2 SAME shapes (± capture on its first step), ROFA,
#: expression, plain generation, for a few batch sizes.
COMPILE_CACHE_SIZE = 32


def compile_modes() -> tuple[str, ...]:
    """The modes ``torch.compile`` accepts in this torch: the keys of
    ``torch._inductor.list_mode_options()`` (2.x: default, reduce-overhead, max-autotune,
    max-autotune-no-cudagraphs, and lite in newer releases). Imports inductor (≈ 2 s), so it
    runs only when a mode is given."""
    from torch._inductor import list_mode_options

    return tuple(list_mode_options())
