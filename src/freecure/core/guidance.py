"""Guidance and batch layouts: which lane and conditioning each denoiser row evaluates, and how a
lane's guided prediction is assembled from its rows (ε_u + w·(ε_c − ε_u), with guidance rescale).

Lane 0 is FD, lane 1 is PD; several images stack lane-major (:meth:`BatchLayout.for_images`).
Nothing here calls a model: the stages (:mod:`freecure.stages`) build layouts and step them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from .conditioning import UNCOND

FD_LANE, PD_LANE = 0, 1


@dataclass(frozen=True)
class BatchLayout:
    """Which latent lane and conditioning each denoiser batch row evaluates, and how each lane's
    guided prediction is assembled from the rows.

    Attributes:
        rows: ``(lane, conditioning key)`` per batch row.
        lanes: per output lane, ``(unconditional row or None, conditional row)``; None means
            the lane is not guided (guidance scale 1).
        capture_row: the row holding FD's conditional branch, whose cross-attention SAME
            records; None when nothing is captured. For several images, the row of the
            one-image layout (see :attr:`capture_rows`).
        images: how many images share the pass (:meth:`for_images`).

    Several images (seeds) at once: lane ``l`` of image ``k`` is lane ``l·n + k`` (lanes stacked
    lane-major: [FD_0 … FD_{n−1}, PD_0 … PD_{n−1}]), and row ``r`` of the one-image layout
    becomes rows ``r·n … r·n + n − 1``, one per image, so the rows of one conditioning key stay
    contiguous and every row keeps its key (a backend's :meth:`Backend.predict_noise` sees
    which rows are FD and which PD, whatever ``n``).
    """

    rows: tuple[tuple[int, str], ...]
    lanes: tuple[tuple[int | None, int], ...]
    capture_row: int | None = None
    images: int = 1

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(key for _, key in self.rows)

    @property
    def capture_rows(self) -> tuple[int, ...] | None:
        """The rows whose attention SAME records, one per image (image order); None: none."""
        if self.capture_row is None:
            return None
        return tuple(self.capture_row * self.images + k for k in range(self.images))

    def for_images(self, n: int) -> BatchLayout:
        """This one-image layout for ``n`` images sharing every denoiser call (see the class doc)."""
        if self.images != 1:
            raise ValueError("for_images expands a one-image layout")
        if n == 1:
            return self
        rows = tuple((lane * n + k, key) for lane, key in self.rows for k in range(n))
        lanes = tuple(
            (None if uncond is None else uncond * n + k, cond * n + k) for uncond, cond in self.lanes for k in range(n)
        )
        return BatchLayout(rows=rows, lanes=lanes, capture_row=self.capture_row, images=n)

    def gather(self, z: torch.Tensor) -> torch.Tensor:
        """Model inputs: ``z[lane]`` for each row, from lanes stacked as (lanes, …)."""
        return z[[lane for lane, _ in self.rows]]

    def guide(self, eps: torch.Tensor, scale: float, rescale: float = 0.0) -> torch.Tensor:
        """Guided ε per lane, stacked as (lanes, C, H, W): ε_u + w·(ε_c − ε_u)."""
        guided = []
        for uncond_row, cond_row in self.lanes:
            eps_c = eps[cond_row : cond_row + 1]
            if uncond_row is None:
                guided.append(eps_c)
                continue
            eps_u = eps[uncond_row : uncond_row + 1]
            eps_g = eps_u + scale * (eps_c - eps_u)
            if rescale > 0:
                eps_g = rescale_noise_cfg(eps_g, eps_c, guidance_rescale=rescale)
            guided.append(eps_g)
        return torch.cat(guided)


def single_lane_layout(key: str, guided: bool, uncond_key: str = UNCOND) -> BatchLayout:
    """One lane conditioned on ``key``: [uncond, cond] when guided, else [cond]."""
    if guided:
        return BatchLayout(rows=((0, uncond_key), (0, key)), lanes=((0, 1),))
    return BatchLayout(rows=((0, key),), lanes=((None, 0),))


@dataclass
class Guidance:
    """Classifier-free guidance of a pass: a lane is [uncond, cond] when ``scale`` ≠ 1.

    For Stable Diffusion ``scale`` is the CFG scale w; for FLUX it is ``true_cfg_scale``
    (default 1: one row per lane), the distilled guidance entering as an embedding instead
    (``Backend.guidance_scale``, see :meth:`freecure.families.ModelFamily.loop_guidance`).
    """

    scale: float = 7.5
    rescale: float = 0.0

    @property
    def cfg(self) -> bool:
        """Whether lanes take an unconditional row."""
        return self.scale != 1.0


def scale_model_input(scheduler, z: torch.Tensor, t) -> torch.Tensor:
    """The scheduler's input scaling; flow-matching schedulers have none and take z as is."""
    scale = getattr(scheduler, "scale_model_input", None)
    return z if scale is None else scale(z, t)
