"""BiSeNet face-parsing network, the paper's Ψ(·) (§4.1, §8.1; Yu et al., ECCV 2018).

This is the variant released with ``79999_iter.pth`` (CelebAMask-HQ, 19 classes): a
ResNet-18 *context path* with two attention refinement modules, whose 1/8-resolution
ResNet feature stands in for the *spatial path*, fused by a feature fusion module. The
module and parameter names match the checkpoint so that it loads with strict key matching.

The ResNet-18 here is randomly initialised: no ImageNet weights are ever downloaded, the
released checkpoint carries the trained backbone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NUM_CLASSES = 19


class ConvBNReLU(nn.Module):
    """Convolution (no bias) → batch norm → ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3×3 convolutions plus a (projected when needed) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = F.relu(self.bn1(self.conv1(x)))
        residual = self.bn2(self.conv2(residual))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


def _stage(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """Two basic blocks; the first one changes width and stride."""
    return nn.Sequential(
        BasicBlock(in_channels, out_channels, stride), BasicBlock(out_channels, out_channels)
    )


class ResNet18(nn.Module):
    """ResNet-18 trunk without its classifier; returns the 1/8, 1/16 and 1/32 features.

    Args:
        width: channels of the stem; the four stages have ``width × (1, 2, 4, 8)``.
    """

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = _stage(width, width, stride=1)
        self.layer2 = _stage(width, 2 * width, stride=2)
        self.layer3 = _stage(2 * width, 4 * width, stride=2)
        self.layer4 = _stage(4 * width, 8 * width, stride=2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        feat8 = self.layer2(self.layer1(x))
        feat16 = self.layer3(feat8)
        feat32 = self.layer4(feat16)
        return feat8, feat16, feat32


def _global_pool(x: torch.Tensor) -> torch.Tensor:
    """Global average pooling that keeps the spatial dimensions (N, C, 1, 1)."""
    return x.mean(dim=(2, 3), keepdim=True)


class AttentionRefinementModule(nn.Module):
    """ARM: a 3×3 conv whose output is re-weighted by a channel attention from its global pool."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_channels, out_channels)
        self.conv_atten = nn.Conv2d(out_channels, out_channels, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        attention = torch.sigmoid(self.bn_atten(self.conv_atten(_global_pool(feat))))
        return feat * attention


class ContextPath(nn.Module):
    """ResNet-18 context path with ARMs on the 1/16 and 1/32 features and a global context.

    Returns the 1/8 ResNet feature (used as the spatial path), the refined context at 1/8
    and the refined context at 1/16.
    """

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        context = 2 * width
        self.resnet = ResNet18(width)
        self.arm16 = AttentionRefinementModule(4 * width, context)
        self.arm32 = AttentionRefinementModule(8 * width, context)
        self.conv_head32 = ConvBNReLU(context, context)
        self.conv_head16 = ConvBNReLU(context, context)
        self.conv_avg = ConvBNReLU(8 * width, context, kernel_size=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feat8, feat16, feat32 = self.resnet(x)
        global_context = self.conv_avg(_global_pool(feat32))  # broadcast over 1/32 grid

        context32 = self.arm32(feat32) + global_context
        context32 = F.interpolate(context32, size=feat16.shape[2:], mode="nearest")
        context32 = self.conv_head32(context32)

        context16 = self.arm16(feat16) + context32
        context16 = F.interpolate(context16, size=feat8.shape[2:], mode="nearest")
        context16 = self.conv_head16(context16)
        return feat8, context16, context32


class FeatureFusionModule(nn.Module):
    """FFM: concatenate spatial and context features, then add a channel-attention residual."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.convblk = ConvBNReLU(in_channels, out_channels, kernel_size=1)
        self.conv1 = nn.Conv2d(out_channels, out_channels // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(out_channels // 4, out_channels, 1, bias=False)

    def forward(self, spatial: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        feat = self.convblk(torch.cat([spatial, context], dim=1))
        attention = torch.sigmoid(self.conv2(F.relu(self.conv1(_global_pool(feat)))))
        return feat + feat * attention


class BiSeNetOutput(nn.Module):
    """Segmentation head: 3×3 ConvBNReLU then a 1×1 classifier (logits at feature resolution)."""

    def __init__(self, in_channels: int, mid_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_channels, mid_channels)
        self.conv_out = nn.Conv2d(mid_channels, num_classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """BiSeNet face parser Ψ: image batch → per-pixel class logits.

    ``BiSeNet()`` has the layout of the released ``79999_iter.pth``. A smaller ``width``
    gives a tiny random network with the same structure for tests.

    Args:
        num_classes: number of output classes (19 for CelebAMask-HQ).
        width: ResNet stem width (64 in the release); every other width scales with it.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 64) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.cp = ContextPath(width)
        self.ffm = FeatureFusionModule(4 * width, 4 * width)
        self.conv_out = BiSeNetOutput(4 * width, 4 * width, num_classes)
        # Auxiliary heads used only for training; kept so the checkpoint loads strictly.
        self.conv_out16 = BiSeNetOutput(2 * width, width, num_classes)
        self.conv_out32 = BiSeNetOutput(2 * width, width, num_classes)

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        """Class logits at the input resolution.

        Args:
            x: normalised images, (N, 3, H, W); H and W should be multiples of 32.
            return_aux: also return the two auxiliary heads' logits (training only).

        Returns:
            (N, num_classes, H, W) logits, bilinearly upsampled from 1/8 resolution with
            ``align_corners=True`` as in the released model; or a tuple of three such
            tensors when ``return_aux`` is true.
        """
        size = x.shape[2:]
        feat8, context8, context16 = self.cp(x)
        logits = self._upsample(self.conv_out(self.ffm(feat8, context8)), size)
        if not return_aux:
            return logits
        aux16 = self._upsample(self.conv_out16(context8), size)
        aux32 = self._upsample(self.conv_out32(context16), size)
        return logits, aux16, aux32

    @staticmethod
    def _upsample(logits: torch.Tensor, size: torch.Size) -> torch.Tensor:
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)
