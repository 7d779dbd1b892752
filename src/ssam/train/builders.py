"""Turn the configuration into the objects of a run: loaders, optimizer, learning-rate schedule."""

from __future__ import annotations

import math
from argparse import Namespace
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from ..data import GPULoader, TrainingData, build_training_data
from ..errors import UsageError, flag_error
from ..models import WIDTH_FLAGS
from ..optim import registry
from ..optim.factory import create_optimizer
from ..optim.fisher import train_mode_refusal
from ..optim.msharp import vectorise_refusal
from .config import build_parser, parse_opt, to_plain
from .identity import run_name


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
        self.with_index = False  # True: (input, target, index), for a loss that looks examples up (SAF)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            # The CPU generator alone (what fork_rng saves): torch.manual_seed would also record a traceback per call
            # for lazy CUDA seeding, about 3 ms an example on a CPU. Same stream.
            torch.random.default_generator.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
            item = self.dataset[index]
        return (*item, index) if self.with_index else item


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
        # Its own generator for the workers' base seed: drawn from the global one, a mid-epoch resume would leave
        # the global stream one draw ahead of an uninterrupted run (SeededAugment seeds every example anyway).
        generator=torch.Generator().manual_seed(cfg.seed),
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
        generator=torch.Generator().manual_seed(cfg.seed),  # not the global stream (see train_loader)
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


# ------------------------------------------------------------------------------------------ data and model
def build_data(cfg: Namespace) -> TrainingData:
    """The run's data (subset, label noise, validation split: ``ssam.data.build_training_data``)."""
    try:
        return build_training_data(
            cfg.dataset,
            cfg.datadir,
            cfg.download,
            augment=cfg.augment == "standard",
            train_subset=cfg.train_subset,
            label_noise=cfg.label_noise,
            val_split=cfg.val_split,
            seed=cfg.seed,
        )
    except ValueError as e:  # a size known only once the files are read; a bad data file (its own message)
        raise UsageError(flag_error(e)) from None


def model_args(cfg: Namespace, info: Any) -> dict:
    """What a checkpoint records to rebuild the model (``ssam.checkpoint.model_from_checkpoint``)."""
    args = {
        "name": cfg.model,
        "num_classes": info.num_classes,
        "in_channels": info.in_channels,
        "image_size": info.image_size,
    }
    width = model_width(cfg)
    if width is not None:
        args["width"] = width
    return args


def model_width(cfg: Namespace) -> int | None:
    """The width flag of the run's model (``--mlp_width``, ``--cnn_width``), or None for a fixed-shape model."""
    flag = WIDTH_FLAGS.get(cfg.model)
    return None if flag is None else getattr(cfg, flag[0])


@dataclass
class Loaders:
    train: Any  # GPULoader or DataLoader
    test: Any
    holdout: Any  # the validation split (None without --val_split)
    noisy: Any  # the training examples in order, for the memorization measure (None without --label_noise)
    fisher: Any  # where SSAM-F draws its Fisher examples from


def _eval_loader(cfg: Namespace, ds: Any, device: torch.device, rank: int, world: int) -> Any:
    """In order, without augmentation; under --gpu_data an in-memory set is evaluated in device batches (one
    Python call per example would cost more than an MLP's whole epoch)."""
    if cfg.gpu_data and world == 1 and hasattr(ds, "augmentation"):
        return GPULoader.from_dataset(ds, max(cfg.batch_size, 256), device=device, augment=False, shuffle=False)
    return eval_loader(cfg, ds, rank, world)


def build_loaders(cfg: Namespace, data: TrainingData, device: torch.device, rank: int, world: int) -> Loaders:
    if cfg.gpu_data:
        train: Any = GPULoader.from_dataset(
            data.train, cfg.batch_size, device=device, augment=True, shuffle=True, drop_last=True, seed=cfg.seed
        )
    else:
        train = train_loader(cfg, data.train, rank, world)
    if getattr(cfg, "saf", None) is not None:  # SAF looks each example's past logits up by its index
        (train if cfg.gpu_data else train.dataset).with_index = True
    val_world = world if cfg.distributed_val else 1
    return Loaders(
        train=train,
        test=_eval_loader(cfg, data.test, device, rank if cfg.distributed_val else 0, val_world),
        # The validation split and the memorization pass are small next to training: rank 0 measures them alone.
        holdout=_eval_loader(cfg, data.val, device, 0, 1) if data.val is not None else None,
        noisy=_eval_loader(cfg, data.train_plain, device, 0, 1) if cfg.label_noise else None,
        fisher=train.dataset if not cfg.gpu_data else data.train,
    )


def micro_batch_plan(cfg: Namespace, model: torch.nn.Module, sam: bool, refresh: str | None) -> tuple[bool, str]:
    """(vectorised, the log's note) for --sam_micro_batch: two batched passes where the model allows
    (``ssam.optim.msharp.vectorised_ascent``), else a loop over the chunks; ("", nothing to say) without it."""
    m = cfg.sam_micro_batch
    if not sam or m is None or m >= cfg.batch_size:
        return False, ""
    why = vectorise_refusal(model, cfg.batch_size, [p for p in model.parameters() if p.requires_grad])
    why = why or ("--amp" if cfg.amp != "none" else None) or ("--skip_dead" if cfg.skip_dead else None)
    if m > 1 and why is None and (cfg.adaptive or refresh is not None):
        why = "a mask or ASAM with chunks of more than one example"
    return why is None, "vectorised (two batched passes)" if why is None else f"a loop over the chunks ({why})"


def settle_fisher_mode(cfg: Namespace, model: torch.nn.Module, train_data: Any) -> str | None:
    """SSAM-F's ``--fisher_mode``: ``auto`` becomes ``train`` where every BatchNorm of the model sees more than one
    value per channel in a batch of one, else ``eval`` (the run's config and name record the concrete mode: a run
    that ``train`` could train keeps its old name); an explicit ``train`` that cannot run is a UsageError. Returns
    the line the log says once about the choice (None when there was none to make)."""
    if not registry.applies("fisher_mode", parse_opt(cfg.opt)[0]) or cfg.eval_only:
        return None
    example = train_data[0][0]
    refusal = train_mode_refusal(model, example)
    if cfg.fisher_mode == "train" and refusal:
        raise UsageError(
            f"--fisher_mode train: {refusal}, which a per-example BatchNorm batch cannot normalise; allowed: "
            "--fisher_mode eval (the running statistics) or auto"
        )
    if cfg.fisher_mode != "auto":
        return None
    cfg.fisher_mode = "eval" if refusal else "train"
    if refusal and cfg.name_from_settings:  # 'eval' names the run ('auto' and 'train' name it alike: identity.py)
        cfg.output_name = run_name(to_plain(cfg), to_plain(build_parser().parse_args([])))
    why = f" ({refusal})" if refusal else " (every BatchNorm sees more than one value per channel in a batch of one)"
    return f"fisher_mode auto: {cfg.fisher_mode}{why}"


@torch.no_grad()
def check_model_fits(cfg: Namespace, model: torch.nn.Module, train_data: Any) -> None:
    """One forward of a training example (eval mode, nothing updated), so that a model that cannot take the data's
    images (a ViT's patch larger than the image) is one line before the run folder exists, not a traceback after."""
    x = torch.as_tensor(train_data[0][0])
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    try:
        model.eval()
        model(x.to(device)[None])
    except (RuntimeError, ValueError, AssertionError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UsageError(
            f"--model {cfg.model} cannot take --dataset {cfg.dataset}'s {tuple(x.shape)} inputs: {first}; allowed: "
            "a model built for that image size"
        ) from None
    finally:
        model.train(was_training)
