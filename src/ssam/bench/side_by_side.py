"""The optimizers side by side: one model copy and one optimizer per name, all from the same initial weights, each
stepping as the trainer steps."""

from __future__ import annotations

import argparse
import contextlib
import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..models import build_model
from ..optim import SAM
from ..optim.factory import create_optimizer
from ..train.step import train_step
from .args import LR, MOMENTUM, OPT_OF, OPTIMIZERS, RHO, SHAPES, SPARSITY, WEIGHT_DECAY

# The second pass runs at w + e, whose batch statistics are not the model's: it leaves BatchNorm's running
# statistics alone (the trainer's --freeze_bn_second_pass), as this benchmark has always timed it.
FREEZE_BN_SECOND_PASS = True


def autocast(device: torch.device, amp: bool) -> Callable[[], contextlib.AbstractContextManager]:
    if not amp:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def make_optimizer(name: str, model: nn.Module, num_samples: int, **kw) -> torch.optim.Optimizer:
    """The optimizer a table row names, built by the trainer's factory with the CIFAR recipe's settings."""
    opt = OPT_OF[name]
    settings: dict = {"momentum": MOMENTUM}
    if opt != "sgd":
        settings["rho"] = RHO
    if opt.startswith("ssam"):
        settings["sparsity"] = SPARSITY
    if opt.startswith("ssamf"):
        settings["num_samples"] = num_samples
    return create_optimizer(model, opt, lr=LR, weight_decay=WEIGHT_DECAY, **{**settings, **kw})


def step_fn(
    net: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    amp: Callable[[], contextlib.AbstractContextManager],
    *,
    model: nn.Module | None = None,
    skip_dead: bool = False,
) -> Callable[[], None]:
    """One training step exactly as the trainer runs it (forward, backward, update; SAM-type: both passes)."""
    batch = [(x, y)]
    # As the trainer does: on a CPU, zero gradients in place, since freeing them means fresh pages to fault in on
    # the next backward (two per SAM step).
    to_none = x.device.type != "cpu"

    def step() -> None:
        train_step(
            net,
            opt,
            batch,
            model=model,
            autocast=amp,
            skip_dead=skip_dead,
            freeze_bn_second_pass=FREEZE_BN_SECOND_PASS,
            grads_to_none=to_none,
        )

    return step


def optimizer_only_fn(opt: torch.optim.Optimizer) -> Callable[[], None]:
    """The optimizer's own work with the gradients left in place: SGD ``step``, SAM-type both half-steps."""
    if not isinstance(opt, SAM):
        return opt.step

    def both() -> None:
        opt.first_step(zero_grad=False)
        opt.second_step(zero_grad=False)

    return both


def random_batches(
    args: argparse.Namespace,
    device: torch.device,
    gen: torch.Generator,
    fmt: torch.memory_format = torch.contiguous_format,
):
    """(x, y, fisher_data): one training batch and one batch of ``--num_samples`` examples, of the data set's shape."""
    channels, size, classes = SHAPES[args.shape_key]
    x = torch.randn(args.batch_size, channels, size, size, generator=gen).to(device, memory_format=fmt)
    y = torch.randint(0, classes, (args.batch_size,), generator=gen).to(device)
    fisher_data = [
        (
            torch.randn(args.num_samples, channels, size, size, generator=gen).to(device),
            torch.randint(0, classes, (args.num_samples,), generator=gen).to(device),
        )
    ]
    return x, y, fisher_data


class SideBySide:
    """One model copy and optimizer per optimizer name, all from the same initial weights."""

    def __init__(
        self,
        args: argparse.Namespace,
        device: torch.device,
        *,
        amp: bool,
        channels_last: bool,
        compile: bool,
        names: tuple[str, ...] = OPTIMIZERS,
    ):
        channels, size, classes = SHAPES[args.shape_key]
        gen = torch.Generator().manual_seed(args.seed)
        torch.manual_seed(args.seed)
        base = build_model(args.model, classes, in_channels=channels, image_size=size).to(device)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            base = base.to(memory_format=fmt)
        self.x, self.y, self.fisher_data = random_batches(args, device, gen, fmt)
        self.num_params = sum(p.numel() for p in base.parameters())
        self.raw: dict[str, nn.Module] = {}
        self.models: dict[str, nn.Module] = {}
        self.opts: dict[str, torch.optim.Optimizer] = {}
        self.compile_error: str | None = None
        for name in names:
            raw = copy.deepcopy(base)
            self.raw[name] = raw
            self.models[name] = raw
            self.opts[name] = make_optimizer(name, raw, args.num_samples)
        if compile:
            try:
                for name in names:
                    self.models[name] = torch.compile(self.raw[name])
            except Exception as e:  # noqa: BLE001 - any compiler failure means "no compiled numbers"
                self.compile_error = f"{type(e).__name__}: {e}"
                self.models = dict(self.raw)
        self._amp = autocast(device, amp)
        self._build_fns()

    def _build_fns(self) -> None:
        self.steps = {
            n: step_fn(m, self.opts[n], self.x, self.y, self._amp, model=self.raw[n]) for n, m in self.models.items()
        }
        self.loss_at = {n: (lambda m=m: F.cross_entropy(m(self.x), self.y)) for n, m in self.models.items()}

    def prepare_masks(self) -> None:
        """Masks the timed steps need: SSAM-F's from the Fisher (unless already set), SSAM-D's exists already."""
        if "SSAM-F" in self.opts and not self.opts["SSAM-F"].has_masks():
            self.opts["SSAM-F"].update_mask(self.raw["SSAM-F"], self.fisher_data)

    def first_steps(self, warmup: int) -> Exception | None:
        """Run the warmup steps (compiling, if asked); a compiler failure falls back to eager, said in the report."""
        try:
            for _ in range(max(1, warmup)):
                for fn in self.steps.values():
                    fn()
        except Exception as e:  # noqa: BLE001
            if self.models is self.raw or all(self.models[n] is self.raw[n] for n in self.models):
                raise
            self.compile_error = f"{type(e).__name__}: {e}".splitlines()[0][:500]
            for name in self.opts:
                opt = self.opts[name]
                if isinstance(opt, SAM):
                    opt.restore()
                opt.zero_grad(set_to_none=True)
                self.models[name] = self.raw[name]
            self._build_fns()
            return e
        return None
