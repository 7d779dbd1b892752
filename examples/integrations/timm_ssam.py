"""Sparse SAM on a timm model: build it with random weights, create the optimizer with timm's weight-decay groups,
refresh the SSAM-F mask before each epoch and train with the two-pass loop. Runs on the CPU in seconds on
synthetic images (nothing is downloaded).

    python examples/integrations/timm_ssam.py --model test_resnet --epochs 3
    python examples/integrations/timm_ssam.py --opt ssamd-sgd
"""

import argparse
import contextlib

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import ssam
from ssam.integrations.timm import build_timm_model


def synthetic(n=64, size=32, num_classes=3):
    """Images whose class is the colour channel with the largest mean: a pattern a small CNN learns in a few steps."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    x[torch.arange(n), y] += 0.5
    return TensorDataset(x, y)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="test_resnet", help="any name from timm.list_models()")
    ap.add_argument("--opt", default="ssamf-sgd", help="ssamf-sgd, ssamd-sgd, sam-sgd, ssamf-adamw ...")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch_size", type=int, default=32)
    args = ap.parse_args()

    torch.manual_seed(0)
    model = build_timm_model(args.model, num_classes=3, image_size=32)  # pretrained=False: random weights
    data = synthetic()
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))

    # no_decay_bias_norm=True: timm's convention (no weight decay on biases, norms, model.no_weight_decay()).
    # fisher_mode="eval": at 32x32 a ResNet's last BatchNorm sees 1x1 maps, which one example cannot normalise.
    sparse = {"sam": {}, "ssamf": dict(sparsity=0.5, num_samples=32, fisher_mode="eval"), "ssamd": dict(sparsity=0.5)}
    opt = ssam.create_optimizer(
        model,
        args.opt,
        lr=args.lr,
        momentum=0.9,
        weight_decay=5e-4,
        no_decay_bias_norm=True,
        rho=0.05,
        **sparse[args.opt.split("-")[0]],
    )
    mask_refresh = getattr(opt, "mask_refresh", None)  # None for SAM and plain torch optimizers

    for epoch in range(args.epochs):
        model.train()
        if mask_refresh == "before_epoch":  # SSAM-F: the Fisher of num_samples training examples
            opt.refresh_mask(epoch, model=model, data=data, generator=torch.Generator().manual_seed(epoch))
        total, seen = 0.0, 0
        for i, (x, y) in enumerate(loader):
            # Pass one at w: its gradient sets the perturbation. first_pass() skips the weight gradients of tensors
            # SSAM masks out entirely; not around the backward SSAM-D's refresh scores (dead entries compete too).
            scored = i == 0 and mask_refresh == "first_backward"
            with contextlib.nullcontext() if scored else opt.first_pass():
                loss = F.cross_entropy(model(x), y)
                loss.backward()
            if scored:
                opt.refresh_mask(epoch)

            def closure():  # pass two at w + e, its gradient is the one the base optimizer steps with
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
            opt.zero_grad()
            total, seen = total + float(loss.detach()) * len(y), seen + len(y)
        density = opt.mask_density() if hasattr(opt, "mask_density") else 1.0
        print(f"epoch {epoch} mask density {density:.3f}")
        print(f"loss after epoch {epoch + 1} {total / seen:.4f}")


if __name__ == "__main__":
    main()
