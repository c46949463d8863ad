"""Latents → images, the way the pipeline's family decodes them, refusing an image that is none
(NaN, infinity or one colour everywhere: :class:`~freecure.core.errors.BlankImageError`)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..core.errors import BLANK_IMAGE_ADVICE, BlankImageError
from ..families import family_of


def decode_latents(pipeline, latents: torch.Tensor, image_size: tuple[int, int] | None = None) -> list[Image.Image]:
    """VAE-decode latents to PIL images the way the pipeline's family does (SD: unscale;
    FLUX: unpack, unscale and unshift), upcasting the VAE where its config asks for it.
    ``image_size`` (pixels) is needed to unpack FLUX latents.

    A run never succeeds with an image that is none: NaN or infinity in the latents or in the
    VAE's output (which would become black pixels), or an image of one colour everywhere.

    Raises:
        BlankImageError: one of those, with what to check.
    """
    count = len(latents)
    finite = torch.isfinite(latents.reshape(count, -1)).all(dim=1)
    if not bool(finite.all()):
        bad = count - int(finite.sum())
        raise BlankImageError(
            f"the run produced a non-finite image: {bad} of {count} latents hold NaN or infinity after "
            f"denoising; {BLANK_IMAGE_ADVICE}"
        )

    def check_decoded(module, args, output):  # NaN pixels would be cast to black silently
        if isinstance(output, torch.Tensor) and not bool(torch.isfinite(output).all()):
            raise BlankImageError(
                f"the run produced a non-finite image: the VAE's output holds NaN or infinity; {BLANK_IMAGE_ADVICE}"
            )

    decoder = getattr(getattr(pipeline, "vae", None), "decoder", None)
    hook = decoder.register_forward_hook(check_decoded) if isinstance(decoder, torch.nn.Module) else None
    try:
        images = family_of(pipeline).decode(pipeline, latents, image_size)
    finally:
        if hook is not None:
            hook.remove()
    for index, image in enumerate(images):
        pixels = np.asarray(image)
        if pixels.size and bool((pixels == pixels[0, 0]).all()):
            colour = tuple(int(v) for v in np.atleast_1d(pixels[0, 0]))
            raise BlankImageError(
                f"the run produced a blank image: image {index + 1} of {len(images)} is one colour {colour} "
                f"everywhere; {BLANK_IMAGE_ADVICE}"
            )
    return images
