"""The TF-Inception (2015-12-05) network used by every FID implementation.

This is the graph of Szegedy et al.'s Inception-v3 as TensorFlow shipped it for
FID (Heusel et al., 2017), not torchvision's Inception-v3: its average pools skip
the zero padding, and the last mixed block max-pools. The parameter names follow
torch-fidelity's ``FeatureExtractorInceptionV3`` (which torchmetrics uses), so its
published weight file ``weights-inception-2015-12-05-6726825d.pth`` loads here
without the ``torch_fidelity`` package, and always through
``torch.load(weights_only=True)``: a ``.pth`` file is a pickle and must never run code.

Besides the network, two helpers write *randomly initialised* weight files in both
published formats. They exist for tests and dry runs: a random Inception gives
meaningless FIDs, but exercises every code path offline.
"""

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

FEATURE_DIM = 2048


class ConvBN(nn.Module):
    """Convolution without bias, batch norm (TF's epsilon 1e-3), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def tf_same_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """3x3 average pool with TensorFlow's 'SAME' semantics: padded zeros are not counted."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class MixedA(nn.Module):
    """35x35 block: 1x1, 5x5, double 3x3 and pooled branches."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(in_channels, 64, 1)
        self.branch5x5_1 = ConvBN(in_channels, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = self.branch5x5_2(self.branch5x5_1(x))
        deep = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        pooled = self.branch_pool(tf_same_avg_pool(x))
        return torch.cat([self.branch1x1(x), wide, deep, pooled], 1)


class ReductionB(nn.Module):
    """35x35 -> 17x17 grid reduction."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = ConvBN(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        deep = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), deep, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class MixedC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (1x7 then 7x1)."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c = channels_7x7
        self.branch1x1 = ConvBN(in_channels, 192, 1)
        self.branch7x7_1 = ConvBN(in_channels, c, 1)
        self.branch7x7_2 = ConvBN(c, c, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(in_channels, c, 1)
        self.branch7x7dbl_2 = ConvBN(c, c, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c, c, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c, c, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        double = self.branch7x7dbl_1(x)
        double = self.branch7x7dbl_3(self.branch7x7dbl_2(double))
        double = self.branch7x7dbl_5(self.branch7x7dbl_4(double))
        pooled = self.branch_pool(tf_same_avg_pool(x))
        return torch.cat([self.branch1x1(x), single, double, pooled], 1)


class ReductionD(nn.Module):
    """17x17 -> 8x8 grid reduction."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(in_channels, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(in_channels, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        short = self.branch3x3_2(self.branch3x3_1(x))
        long = self.branch7x7x3_2(self.branch7x7x3_1(x))
        long = self.branch7x7x3_4(self.branch7x7x3_3(long))
        return torch.cat([short, long, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class MixedE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs.

    ``max_pool`` reproduces a quirk of the TF graph: its last block max-pools where
    the paper (and torchvision) average-pool. FID features depend on it.
    """

    max_pool: bool

    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(in_channels, 320, 1)
        self.branch3x3_1 = ConvBN(in_channels, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(in_channels, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        split = self.branch3x3_1(x)
        split = torch.cat([self.branch3x3_2a(split), self.branch3x3_2b(split)], 1)
        deep = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        deep = torch.cat([self.branch3x3dbl_3a(deep), self.branch3x3dbl_3b(deep)], 1)
        if self.max_pool:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = tf_same_avg_pool(x)
        return torch.cat([self.branch1x1(x), split, deep, self.branch_pool(pooled)], 1)


class TFInceptionV3(nn.Module):
    """TF-Inception trunk: input ``(N, 3, 299, 299)`` already scaled to [-1, 1], output the
    2048-d pool features. ``fc`` (1008 TF classes) is kept only so weight files load strictly."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = MixedA(192, pool_features=32)
        self.Mixed_5c = MixedA(256, pool_features=64)
        self.Mixed_5d = MixedA(288, pool_features=64)
        self.Mixed_6a = ReductionB(288)
        self.Mixed_6b = MixedC(768, channels_7x7=128)
        self.Mixed_6c = MixedC(768, channels_7x7=160)
        self.Mixed_6d = MixedC(768, channels_7x7=160)
        self.Mixed_6e = MixedC(768, channels_7x7=192)
        self.Mixed_7a = ReductionD(768)
        self.Mixed_7b = MixedE(1280, max_pool=False)
        self.Mixed_7c = MixedE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, 1008)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6a(x)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def load_torch_fidelity_inception(path: str | Path) -> TFInceptionV3:
    """Build the network from torch-fidelity's weight file, reading it as tensors only."""
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (found {type(state).__name__})")
    model = TFInceptionV3()
    result = model.load_state_dict(state, strict=False)
    # Files saved from an older torch may lack BatchNorm's step counter, which inference never reads.
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path} is not torch-fidelity's Inception weight file: "
            f"missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    return model.eval().requires_grad_(False)


class CleanFidCallingConvention(nn.Module):
    """The interface of clean-fid's TorchScript file ``inception-2015-12-05.pt``.

    clean-fid reaches the file two ways: ``base(x, return_features=True)`` on raw
    [0, 255] images (it resizes inside), and, in clean mode, ``base.layers`` on
    images it resized and scaled to [-1, 1] itself. This module offers both, so a
    scripted random copy stands in for the real file in tests.
    """

    def __init__(self, trunk: TFInceptionV3):
        super().__init__()
        self.layers = trunk

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = img.to(torch.float32)
        if x.shape[2] != 299 or x.shape[3] != 299:  # literals: TorchScript cannot read module globals
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        features = self.layers((x - 128) / 128)
        if return_features:
            return features
        return self.layers.fc(features)


def random_tf_inception(seed: int = 0) -> TFInceptionV3:
    """A randomly initialised TF-Inception, for tests only (its FIDs mean nothing).

    He-normal convolutions keep activations at a sane scale through the ~90 layers,
    so the random features are neither vanishing nor saturated.
    """
    generator = torch.Generator().manual_seed(seed)
    model = TFInceptionV3()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
    return model.eval().requires_grad_(False)


def write_random_torch_fidelity_weights(path: str | Path, seed: int = 0) -> Path:
    """Write a random state dict in the format of ``weights-inception-2015-12-05-6726825d.pth``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_tf_inception(seed).state_dict(), path)
    return path


def write_random_torchscript_inception(path: str | Path, seed: int = 0) -> Path:
    """Write a random TorchScript file with the calling convention of ``inception-2015-12-05.pt``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated, but it is the format clean-fid reads
        scripted = torch.jit.script(CleanFidCallingConvention(random_tf_inception(seed)).eval())
    scripted.save(str(path))
    return path
