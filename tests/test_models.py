import pytest
import torch
from torch import nn

from ssam.errors import UsageError
from ssam.models import MODELS, build_model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def on_meta(name, **kw):
    # Parameter counts need shapes only; the meta device skips allocating and initialising
    # tens of millions of weights.
    with torch.device("meta"):
        return build_model(name, **kw)


EXPECTED_NAMES = {
    "mlp",
    "cnn_bn",
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
    "resnet8",
    "cnn_small",
}


def test_registry_names():
    assert set(MODELS) == EXPECTED_NAMES


@pytest.mark.parametrize(
    "name,count",
    [
        ("resnet18", 11_173_962),
        ("wideresnet28x10", 36_479_194),
        # Reference counts of the usual CIFAR definitions (1x1-conv+BN shortcuts, VGG linear head).
        ("resnet34", 21_282_122),
        ("resnet50", 23_520_842),
        ("vgg16_bn", 14_728_266),
    ],
)
def test_cifar10_parameter_counts(name, count):
    assert n_params(on_meta(name, num_classes=10)) == count


def test_cifar100_head_size():
    diff = n_params(on_meta("resnet18", num_classes=100)) - n_params(on_meta("resnet18", num_classes=10))
    assert diff == 90 * 512 + 90


def test_resnet_cifar_stem_and_no_maxpool():
    m = on_meta("resnet18", num_classes=10)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert not any(isinstance(x, nn.MaxPool2d) for x in m.modules())


def test_imagenet_size_uses_torchvision_resnet():
    import torchvision

    m = on_meta("resnet50", num_classes=1000, image_size=224)
    assert isinstance(m, torchvision.models.ResNet)
    assert n_params(m) == 25_557_032
    assert m.conv1.kernel_size == (7, 7)


def test_imagenet_resnet_adapts_in_channels():
    m = build_model("resnet18", num_classes=5, in_channels=1, image_size=128)
    m.eval()
    with torch.no_grad():
        assert m(torch.randn(1, 1, 128, 128)).shape == (1, 5)


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn", "resnet8", "cnn_small"])
def test_forward_cifar_shape(name):
    torch.manual_seed(0)
    m = build_model(name, num_classes=10)
    out = m(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def test_forward_small_wideresnet_cifar_shape():
    from ssam.models.wideresnet import WideResNet

    m = WideResNet(depth=10, widen=1, num_classes=7)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_forward_every_model_on_digits_shape(name):
    # Random init of the 40-60M-parameter nets dominates the run time and is irrelevant to
    # shapes, so materialise from meta with zero weights (and unit running_var so BN is finite).
    m = on_meta(name, num_classes=10, in_channels=1, image_size=8)
    m.to_empty(device="cpu")
    for key, t in m.state_dict().items():
        t.fill_(1 if key.endswith("running_var") else 0)
    m.eval()
    with torch.no_grad():
        assert m(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_vgg_skips_pools_that_would_empty_the_map():
    pools = lambda m: sum(isinstance(x, nn.MaxPool2d) for x in m.modules())
    assert pools(on_meta("vgg16_bn", num_classes=10, image_size=32)) == 5
    assert pools(on_meta("vgg16_bn", num_classes=10, in_channels=1, image_size=8)) == 3
    # Conv layers are kept regardless, so the parameter count does not depend on image size
    # apart from the first conv's input channels.
    assert n_params(on_meta("vgg11_bn", num_classes=10, image_size=8)) == n_params(
        on_meta("vgg11_bn", num_classes=10, image_size=32)
    )


def test_in_channels_changes_first_conv_only():
    a = n_params(on_meta("resnet18", num_classes=10, in_channels=3))
    b = n_params(on_meta("resnet18", num_classes=10, in_channels=1))
    assert a - b == 2 * 64 * 9


def test_wideresnet_dropout_default_off():
    m = on_meta("wideresnet28x10", num_classes=10)
    assert all(blk.dropout == 0.0 for blk in m.blocks)


def test_small_model_has_batchnorm_and_trains_a_step():
    torch.manual_seed(0)
    m = build_model("resnet8", num_classes=10, in_channels=1, image_size=8)
    assert any(isinstance(x, nn.BatchNorm2d) for x in m.modules())
    x, y = torch.randn(16, 1, 8, 8), torch.randint(10, (16,))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    before = nn.functional.cross_entropy(m(x), y)
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    assert nn.functional.cross_entropy(m(x), y) < before


def test_unknown_model_message():
    with pytest.raises(UsageError) as e:
        build_model("resnet19", num_classes=10)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("unknown --model 'resnet19'; choose from: resnet18, resnet34")
    assert all(n in msg for n in EXPECTED_NAMES)


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_classes=0),
        dict(num_classes=-3),
        dict(num_classes=2.0),
        dict(num_classes=True),
        dict(num_classes=10, in_channels=0),
        dict(num_classes=10, in_channels="3"),
    ],
)
def test_bad_sizes_rejected(kw):
    with pytest.raises(UsageError):
        build_model("resnet18", **kw)
