"""Turn the configuration into the objects of a run: loaders, optimizer, learning-rate schedule."""

from __future__ import annotations

import math
from argparse import Namespace

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from ..errors import UsageError, flag_error
from ..optim import registry
from ..optim.factory import create_optimizer
from .config import parse_opt


# ------------------------------------------------------------------------------------------ data order
class EpochSampler(Sampler[int]):
    """Shuffled indices that depend only on (seed, epoch), sharded over ranks, resumable mid-epoch.

    Order is a pure function of the epoch, so a resumed run visits exactly the examples the uninterrupted run
    would, and every rank agrees on the permutation without communicating.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, rank: int = 0, world: int = 1) -> None:
        self.n, self.seed, self.shuffle, self.rank, self.world = n, seed, shuffle, rank, world
        self.epoch = 0
        self.start = 0  # index (within this rank's shard) to begin at: mid-epoch resume
        self.per_rank = math.ceil(n / world)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.per_rank * self.world
        order += order[: total - self.n]  # pad so every rank gets the same count, as DistributedSampler does
        return iter(order[self.rank : total : self.world][self.start :])

    def __len__(self) -> int:
        return self.per_rank - self.start


class SeededAugment(Dataset):
    """Draw each example's augmentation from a seed of (run seed, epoch, index).

    Random crops, flips and cutout then no longer depend on worker count, process or resume point: the same
    example in the same epoch is augmented the same way in an interrupted and an uninterrupted run.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
            return self.dataset[index]


def train_loader(cfg: Namespace, dataset: Dataset, rank: int, world: int) -> DataLoader:
    n = len(dataset)  # type: ignore[arg-type]
    sampler = EpochSampler(n, cfg.seed, shuffle=True, rank=rank, world=world)
    # The official code drops the last partial batch; so do we (BatchNorm dislikes a batch of 1).
    batches = BatchSampler(sampler, cfg.batch_size, drop_last=n // world >= cfg.batch_size)
    return DataLoader(
        SeededAugment(dataset, cfg.seed),
        batch_sampler=batches,
        num_workers=cfg.num_workers,
        pin_memory=torch.cuda.is_available(),
    )


def set_loader_epoch(loader: DataLoader, epoch: int, start: int = 0) -> None:
    """Point a ``train_loader`` at an epoch (its order and augmentation), from example ``start`` of this rank."""
    loader.batch_sampler.sampler.set_epoch(epoch, start)  # type: ignore[union-attr]
    loader.dataset.epoch = epoch  # type: ignore[attr-defined]


def eval_loader(cfg: Namespace, dataset: Dataset, rank: int, world: int) -> DataLoader:
    n = len(dataset)  # type: ignore[arg-type]
    sampler = EpochSampler(n, cfg.seed, shuffle=False, rank=rank, world=world) if world > 1 else None
    return DataLoader(
        dataset,
        batch_size=max(cfg.batch_size, 256),
        shuffle=False,
        sampler=sampler,
        num_workers=cfg.num_workers,
        pin_memory=torch.cuda.is_available(),
    )


# ------------------------------------------------------------------------------------------ optimizer
# Settings of a family that the trainer applies around the optimizer, not keywords of its class.
TRAINER_SETTINGS = ("sam_first_pass", "freeze_bn_second_pass", "skip_dead")


def optimizer_settings(cfg: Namespace) -> dict:
    """The keyword arguments ``create_optimizer`` gets from the flags: the settings the registry gives the named
    family and base optimizer (AdamW takes no momentum: the official code crashes passing it)."""
    wrapper, base = parse_opt(cfg.opt)
    names = [*registry.BASES[base].settings, *registry.family(wrapper).settings]
    kw: dict = {registry.KEYWORD_OF.get(k, k): getattr(cfg, k) for k in names if k not in TRAINER_SETTINGS}
    if "betas" in kw:
        kw["betas"] = tuple(kw["betas"])
    if wrapper == "ssamd":  # its death-rate schedule spans the run; its random mask follows the seed
        kw.update(T_start=0, T_end=cfg.epochs, seed=cfg.seed)
    return kw


def build_optimizer(cfg: Namespace, model: torch.nn.Module) -> torch.optim.Optimizer:
    try:
        return create_optimizer(model, cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, **optimizer_settings(cfg))
    except ValueError as e:  # the flags were checked; what is left is a combination the optimizer refuses
        raise UsageError(f"--opt {cfg.opt}: {flag_error(e)}") from None


# ------------------------------------------------------------------------------------------ schedule
class EpochLR:
    """Learning rate as a pure function of the epoch: linear warm-up, then cosine or multi-step.

    Set once per epoch, like the official code. Being stateless apart from the epoch, it resumes exactly.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: Namespace) -> None:
        self.optimizer = optimizer
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.kind, self.epochs, self.eta_min = cfg.lr_scheduler, cfg.epochs, cfg.eta_min
        self.milestones, self.gamma = sorted(cfg.milestone), cfg.gamma
        self.warmup, self.warmup_init = cfg.warmup_epoch, cfg.warmup_init_lr
        self.epoch = 0

    def lr_at(self, epoch: int, base: float) -> float:
        if epoch < self.warmup:
            return self.warmup_init + (base - self.warmup_init) * epoch / self.warmup
        if self.kind == "MultiStepLRscheduler":
            return base * self.gamma ** sum(epoch >= m for m in self.milestones)
        t = (epoch - self.warmup) / max(1, self.epochs - self.warmup)
        return self.eta_min + (base - self.eta_min) * (1 + math.cos(math.pi * t)) / 2

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = self.lr_at(epoch, base)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, sd: dict) -> None:
        self.base_lrs = list(sd["base_lrs"])
        self.set_epoch(int(sd["epoch"]))
