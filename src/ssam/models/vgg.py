"""VGG with BatchNorm for CIFAR-sized inputs (Simonyan & Zisserman configurations A, B, D, E).

Small inputs: a max-pool is skipped when the feature map is already 1 pixel high or wide,
because halving it would leave 0x0 (the 1x8x8 digits set reaches 1x1 after three pools, so the
last two are left out; the convolutions after them still run, at 1x1). A global average pool
before the classifier makes inputs larger than 32px work too, and is the identity at 32px,
where five pools already give 1x1x512.
"""

from __future__ import annotations

import torch
from torch import nn

from .resnet import _init_weights

CFGS = {
    "vgg11_bn": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13_bn": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16_bn": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19_bn": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    def __init__(self, cfg, num_classes: int = 10, in_channels: int = 3, image_size: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for v in cfg:
            if v == "M":
                if size >= 2:
                    layers.append(nn.MaxPool2d(2, 2))
                    size //= 2
            else:
                layers += [nn.Conv2d(channels, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                channels = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool(self.features(x))
        return self.classifier(torch.flatten(out, 1))


def _factory(name: str):
    def build(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
        return VGG(CFGS[name], num_classes, in_channels, image_size)

    build.__name__ = name
    return build


vgg11_bn = _factory("vgg11_bn")
vgg13_bn = _factory("vgg13_bn")
vgg16_bn = _factory("vgg16_bn")
vgg19_bn = _factory("vgg19_bn")
