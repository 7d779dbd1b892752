"""Model zoo: ``build_model(name, num_classes, in_channels, image_size)``.

Every constructor in ``MODELS`` takes ``(num_classes, in_channels=3, image_size=32)``; ``mlp`` and ``cnn_bn`` also take
``width`` (``--mlp_width``, ``--cnn_width``: ``WIDTH_FLAGS`` is the one table of which flag sets which model's width),
which a checkpoint's ``model_args`` records so that the analysis commands rebuild the model.
"""

from __future__ import annotations

from torch import nn

from ..errors import UsageError, did_you_mean
from .cnn_bn import CNNBN, DEFAULT_CNN_WIDTH, cnn_bn
from .mlp import DEFAULT_WIDTH, MLP, mlp
from .resnet import CifarResNet, resnet18, resnet34, resnet50, resnet101, resnet152
from .small import SmallCNN, cnn_small, resnet8
from .vgg import VGG, vgg11_bn, vgg13_bn, vgg16_bn, vgg19_bn
from .wideresnet import WideResNet, wideresnet28x10, wideresnet34x10

MODELS = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
    "resnet152": resnet152,
    "vgg11_bn": vgg11_bn,
    "vgg13_bn": vgg13_bn,
    "vgg16_bn": vgg16_bn,
    "vgg19_bn": vgg19_bn,
    "wideresnet28x10": wideresnet28x10,
    "wideresnet34x10": wideresnet34x10,
    "resnet8": resnet8,
    "cnn_small": cnn_small,
    "cnn_bn": cnn_bn,
    "mlp": mlp,
}
# Models with a width setting (the others have fixed shapes): model -> (its flag's name, its default width).
WIDTH_FLAGS = {"mlp": ("mlp_width", DEFAULT_WIDTH), "cnn_bn": ("cnn_width", DEFAULT_CNN_WIDTH)}
WIDTH_MODELS = tuple(WIDTH_FLAGS)


TIMM_PREFIX = "timm:"
MODEL_FORMS = f"{', '.join(MODELS)}, or {TIMM_PREFIX}NAME (any timm architecture; pip install 'sparse-sam[timm]')"


def check_model_name(name: str, flag: str = "--model") -> None:
    """The one check of a model name (``ssam train``, ``compare``, ``bench``): a key of MODELS or ``timm:NAME``.
    Whether timm knows NAME is checked when the model is built (before anything is written)."""
    if name in MODELS or (name.startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX)):
        return
    # A hint only from names of the same kind: "timm:resnet10t" must not point at our resnet101.
    hint = "" if name.startswith(TIMM_PREFIX) else did_you_mean(name, MODELS)
    raise UsageError(f"unknown {flag} {name!r}; choose from: {MODEL_FORMS}{hint}")


def _positive_int(what: str, value) -> int:
    # bool is an int subclass; True as a class count is always a mistake.
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UsageError(f"{what} must be a positive integer, got {value!r}")
    return value


def build_model(
    name: str, num_classes: int, in_channels: int = 3, image_size: int = 32, width: int | None = None
) -> nn.Module:
    """The model ``name`` (a key of ``MODELS`` or ``timm:NAME``); ``width`` only for the models of WIDTH_MODELS."""
    if width is not None and name not in WIDTH_MODELS:
        raise UsageError(f"width {width!r} given for model {name!r}; only {', '.join(WIDTH_MODELS)} take a width")
    if name.startswith(TIMM_PREFIX):  # any timm architecture, built by the timm integration (extra sparse-sam[timm])
        return _timm_model(name[len(TIMM_PREFIX) :], num_classes, in_channels, image_size)
    check_model_name(name)
    _positive_int("num_classes", num_classes)
    _positive_int("in_channels", in_channels)
    _positive_int("image_size", image_size)
    if width is not None:
        return MODELS[name](
            num_classes, in_channels=in_channels, image_size=image_size, width=_positive_int("width", width)
        )
    return MODELS[name](num_classes, in_channels=in_channels, image_size=image_size)


def _timm_model(name: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    try:
        from .timm import build_timm_model

        return build_timm_model(
            name,
            _positive_int("num_classes", num_classes),
            _positive_int("in_channels", in_channels),
            _positive_int("image_size", image_size),
        )
    except (ImportError, ValueError) as e:
        raise UsageError(f"--model timm:{name}: {e}") from None


__all__ = [
    "MODELS",
    "MODEL_FORMS",
    "WIDTH_MODELS",
    "WIDTH_FLAGS",
    "CNNBN",
    "cnn_bn",
    "check_model_name",
    "build_model",
    "MLP",
    "mlp",
    "CifarResNet",
    "VGG",
    "WideResNet",
    "SmallCNN",
    "resnet8",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "vgg11_bn",
    "vgg13_bn",
    "vgg16_bn",
    "vgg19_bn",
    "wideresnet28x10",
    "wideresnet34x10",
    "cnn_small",
]
