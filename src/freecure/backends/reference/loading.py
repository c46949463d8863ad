"""Loading the released reference-image pipelines from the Hub or a folder, optionally with the
transformer quantized by diffusers' own configs."""

from __future__ import annotations

import logging

import torch

from ...core.errors import WeightsNotFoundError
from .base import quantization_config

logger = logging.getLogger(__name__)


def load_reference_pipeline(pipeline_cls, transformer_cls, source: str, device, dtype, quantize: str = "none"):
    """``pipeline_cls.from_pretrained(source)`` in ``dtype`` on ``device``; with ``quantize`` the
    transformer is loaded first with :func:`quantization_config` and handed to the pipeline.

    Raises:
        WeightsNotFoundError: the repository or folder could not be read (gated repositories
            need ``hf auth login`` and an accepted licence on the model page).
    """
    config = quantization_config(quantize, dtype)
    components = {}
    try:
        if config is not None:
            components["transformer"] = transformer_cls.from_pretrained(
                source, subfolder="transformer", quantization_config=config, torch_dtype=dtype
            )
        pipeline = pipeline_cls.from_pretrained(source, torch_dtype=dtype, **components)
    except (OSError, ValueError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise WeightsNotFoundError(
            f"could not load {source!r} ({first}); it is a gated Hub repository: accept its licence on the "
            "model page and run `hf auth login`, or give --base-model with a local folder. Offline, try --tiny."
        ) from None
    if device is not None:
        pipeline.to(torch.device(device))  # diffusers leaves bitsandbytes-quantized modules where they are
    return pipeline
