"""The flags of ``ssam train``: the official code's (same names, meanings and defaults) plus modern ones, and the
flags page of the docs generated from them. Parsing, defaults that depend on the data set and the checks are in
``config`` and ``validate``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from ..data import DATASETS
from ..errors import ArgumentParser
from ..models import MODEL_FORMS
from ..optim.ascent import parse_ascent
from ..optim.fisher import FISHER_METHODS, FISHER_MODES
from ..optim.groups import parse_granularity
from ..optim.schedule import parse_schedule
from ..optim.sparse import STRATEGIES
from .trajectory import KL_START, KL_TEMPERATURE, MESA_DECAY, MESA_LAMBDA, SAF_LAG, SAF_LAMBDA

SCHEDULERS = ("CosineLRscheduler", "MultiStepLRscheduler")


def _canonical(parse: Callable[[str], object], flag: str) -> Callable[[str], str]:
    """An argparse type: the value parsed once where it is read, kept in its canonical spelling; the parser's
    ValueError ("schedule: got 'x'; allowed: ...") becomes argparse's one line for the flag."""

    def convert(text: str) -> str:
        try:
            return str(parse(text))
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None

    convert.__name__ = flag  # argparse names the type in some messages
    return convert


schedule_type = _canonical(parse_schedule, "sam_schedule")  # "every:2", "looksam:5:0.7"
ascent_type = _canonical(parse_ascent, "sam_ascent")  # "subbatch:0.25", "previous"
granularity_type = _canonical(parse_granularity, "granularity")  # "2:4", "tensor"


# The paper code's SSAM defaults; the library's own (sparsity 0.5, update_freq 1, num_samples 128) suit a loop
# that a user writes, the CLI reproduces the paper's runs.
CLI_SPARSITY = 0.2


def build_parser(prog: str = "ssam train") -> argparse.ArgumentParser:
    p = ArgumentParser(prog=prog, description="Train an image classifier with SGD/AdamW, SAM, SSAM-F or SSAM-D.")
    g = p.add_argument_group("data and model")
    g.add_argument(
        "--dataset",
        default=None,
        help=f"one of {', '.join(DATASETS)}; default CIFAR10_cutout with --datadir, else digits",
    )
    g.add_argument("--datadir", default=None, help="folder holding the data set (layouts: docs/training.md)")
    g.add_argument(
        "--download",
        action="store_true",
        help="allow torchvision to download CIFAR, MNIST or FashionMNIST into --datadir",
    )
    g.add_argument(
        "--model",
        default=None,
        help=f"{MODEL_FORMS}; default cnn_small on digits, MNIST and FashionMNIST, else resnet18",
    )
    g.add_argument(
        "--mlp_width",
        type=int,
        default=None,
        metavar="W",
        help="--model mlp: width of its two hidden layers (default 512)",
    )
    g.add_argument(
        "--cnn_width",
        type=int,
        default=None,
        metavar="W",
        help="--model cnn_bn: channels of its first conv (the second has 2W, the head 16W; default 16)",
    )
    g.add_argument(
        "--augment",
        default="standard",
        choices=("standard", "none"),
        help="training augmentation: the data set's own (crop/flip; cutout for *_cutout) or none (the test transform)",
    )
    g.add_argument(
        "--train_subset",
        type=int,
        default=None,
        metavar="N",
        help="train on N training examples drawn uniformly, fixed by --seed (drawn before --label_noise; default: all)",
    )
    g.add_argument(
        "--val_split",
        type=int,
        default=0,
        metavar="N",
        help="hold out N training examples (noisy labels included) as a validation set evaluated every epoch; "
        "the early-stopped accuracy is the test accuracy at the epoch of best validation accuracy",
    )
    g.add_argument(
        "--num_workers",
        type=int,
        default=None,
        help="DataLoader workers (default 0 for digits, MNIST, FashionMNIST; else min(4, cpus))",
    )
    g.add_argument(
        "--gpu_data",
        action="store_true",
        help="keep an in-memory data set (CIFAR*, digits, MNIST, FashionMNIST) on the device and augment "
        "there in batches",
    )
    g.add_argument(
        "--label_noise",
        type=float,
        default=0.0,
        metavar="P",
        help="replace a fraction P in [0, 1) of the training labels by a random other class, fixed by "
        "--seed (the test set stays clean)",
    )

    g = p.add_argument_group("optimizer")
    g.add_argument("--opt", default="sgd", help="sgd, adamw, or sam-/ssamf-/ssamd- in front of either, e.g. ssamf-sgd")
    g.add_argument("--lr", type=float, default=0.05, help="learning rate (peak, after any warm-up)")
    g.add_argument("--weight_decay", type=float, default=5e-4, help="L2 penalty (SGD) / decoupled decay (AdamW)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--nesterov", action="store_true", help="SGD: Nesterov momentum")
    g.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.999], help="AdamW betas")
    g.add_argument("--eps", type=float, default=1e-8, help="AdamW epsilon (reaches AdamW under SAM/SSAM too)")
    g.add_argument("--rho", type=float, default=0.05, help="SAM radius")
    g.add_argument("--adaptive", action="store_true", help="ASAM: scale the perturbation by |w|")
    g.add_argument(
        "--sparsity",
        type=float,
        default=None,
        help=f"SSAM: fraction of weights NOT perturbed (default {CLI_SPARSITY}, the paper code's; "
        "1 - N/M with --granularity N:M)",
    )
    g.add_argument("--renormalize", action="store_true", help="SSAM: rescale the masked perturbation to norm rho")
    g.add_argument("--update_freq", type=int, default=5, help="SSAM: epochs between mask updates")
    g.add_argument("--num_samples", type=int, default=1024, help="SSAM-F: examples for the Fisher")
    g.add_argument(
        "--fisher_mode",
        default="auto",
        choices=FISHER_MODES,
        help="SSAM-F: model mode for the Fisher: train (each example its own BatchNorm batch, the paper's), eval, or "
        "auto (train where every BatchNorm sees more than one value per channel, else eval; the run's config "
        "records the mode picked)",
    )
    g.add_argument(
        "--fisher_method",
        default="auto",
        choices=FISHER_METHODS,
        help="SSAM-F: per-example gradients for the Fisher (same values; auto = fastest for the device)",
    )
    g.add_argument("--drop_rate", type=float, default=0.5, help="SSAM-D: initial death rate")
    g.add_argument("--drop_strategy", default="gradient", help=f"SSAM-D death score: {', '.join(STRATEGIES)}")
    g.add_argument("--growth_strategy", default="random", help=f"SSAM-D growth score: {', '.join(STRATEGIES)}")
    g.add_argument(
        "--granularity",
        default="element",
        type=granularity_type,
        help="SSAM: what lives and dies together in the mask: element, channel, tensor or N:M (e.g. 2:4)",
    )
    g.add_argument(
        "--cost_aware",
        action="store_true",
        help="SSAM, channel/tensor granularity: weigh each group's score against the first-pass work it keeps alive",
    )
    g.add_argument(
        "--skip_dead",
        action="store_true",
        help="SSAM: the first pass computes no gradient for parameters without a live mask entry",
    )
    g.add_argument(
        "--sam_first_pass",
        default="sync",
        choices=("sync", "local"),
        help="DDP: all-reduce the first gradient (sync) or perturb per device (local, under no_sync)",
    )
    g.add_argument(
        "--sam_schedule",
        default="none",
        type=schedule_type,
        metavar="FORM",
        help="on which steps SAM ascends (the others: one plain pass): none, every:K, looksam:K[:ALPHA], "
        "aesam[:C] or late:FRACTION (docs/optimizers.md, Ascent schedules)",
    )
    g.add_argument(
        "--sam_ascent",
        default="gradient",
        type=ascent_type,
        metavar="FORM",
        help="where the perturbation's direction comes from: gradient (pass one on the batch), subbatch:F (pass "
        "one on a fraction F of it), previous (the last step's gradient), momentum or msam (the base optimizer's "
        "momentum, uphill or downhill): the last three take one pass (docs/optimizers.md, Ascent directions)",
    )
    g.add_argument(
        "--sam_micro_batch",
        type=int,
        default=None,
        metavar="M",
        help="m-sharpness: one perturbation per chunk of M examples of the batch (default: the whole batch; 1: per "
        "example, vectorised where the model allows)",
    )
    g.add_argument(
        "--freeze_bn_second_pass",
        action="store_true",
        help="do not update BatchNorm running statistics in SAM's second forward pass",
    )

    g = p.add_argument_group("trajectory losses: SAF and MESA (no ascent; with --opt sgd or adamw)")
    g.add_argument(
        "--saf",
        type=float,
        default=None,
        metavar="LAMBDA",
        help=f"SAF: add LAMBDA * T^2 * KL(the example's logits LAG epochs ago || now), one pass (paper: {SAF_LAMBDA})",
    )
    g.add_argument(
        "--mesa",
        type=float,
        default=None,
        metavar="LAMBDA",
        help=f"MESA: the same KL against an EMA teacher's logits, one extra forward (paper: {MESA_LAMBDA})",
    )
    g.add_argument(
        "--kl_temperature", type=float, default=KL_TEMPERATURE, metavar="T", help="SAF/MESA: the KL's temperature"
    )
    g.add_argument(
        "--kl_start",
        type=int,
        default=KL_START,
        metavar="EPOCH",
        help="SAF/MESA: first epoch (from 0) with the KL term",
    )
    g.add_argument("--saf_lag", type=int, default=SAF_LAG, metavar="E", help="SAF: epochs between the logits compared")
    g.add_argument("--mesa_decay", type=float, default=MESA_DECAY, help="MESA: the teacher's EMA decay per step")

    g = p.add_argument_group("schedule")
    g.add_argument("--epochs", type=int, default=None, help="epochs (default 200, 15 on digits)")
    g.add_argument("--start_epoch", type=int, default=0, help="epoch to start at (the schedule starts there)")
    g.add_argument("--batch_size", type=int, default=None, help="per-process batch size (default 128, 64 on digits)")
    g.add_argument("--grad_accum", type=int, default=1, help="micro-batches per step (both SAM passes)")
    g.add_argument("--lr_scheduler", default="CosineLRscheduler", help=" or ".join(SCHEDULERS))
    g.add_argument("--eta_min", type=float, default=0.0, help="cosine: the final learning rate")
    g.add_argument(
        "--milestone",
        type=int,
        nargs="+",
        default=[60, 120, 160],
        help="multi-step: epochs at which the learning rate is multiplied by --gamma",
    )
    g.add_argument("--gamma", type=float, default=0.2, help="multi-step: learning-rate factor at each milestone")
    g.add_argument("--warmup_epoch", type=int, default=0, help="epochs of linear warm-up")
    g.add_argument("--warmup_init_lr", type=float, default=0.0, help="learning rate at the start of the warm-up")
    g.add_argument("--seed", type=int, default=1234, help="seed of weights, data order, augmentation, masks")
    g.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)")

    g = p.add_argument_group("run, logs, checkpoints")
    g.add_argument("--output_dir", default="logs", help="folder holding the run folders")
    g.add_argument(
        "--output_name",
        default=None,
        help="run folder name (default: a readable prefix and a hash of the settings that shape the run)",
    )
    g.add_argument("--resume", action="store_true", help="continue from the run folder's last.pt")
    g.add_argument("--resume_path", default=None, help="checkpoint to continue from")
    g.add_argument(
        "--allow_changed_flags",
        action="store_true",
        help="--resume even though flags that shape the run differ from the checkpoint's (logged)",
    )
    g.add_argument("--overwrite", action="store_true", help="replace a run folder that already holds a run")
    g.add_argument("--save_every_steps", type=int, default=0, help="also write last.pt every N steps (0: off)")
    g.add_argument("--log_freq", type=int, default=200, help="steps between progress lines when not on a terminal")
    g.add_argument("--quiet", action="store_true", help="no progress bar or step lines (the epoch lines stay)")
    g.add_argument("--wandb", action="store_true", help="log to Weights & Biases (pip install 'sparse-sam[wandb]')")
    g.add_argument("--wandb_project", default="ssam", help="wandb project")
    g.add_argument("--wandb_name", default=None, help="wandb run name (default: the run folder name)")
    g.add_argument("--tensorboard", action="store_true", help="write TensorBoard scalars to RUN/tensorboard")
    g.add_argument(
        "--eval_only", action="store_true", help="evaluate the checkpoint (--resume_path or best.pt) and exit"
    )
    g.add_argument("--limit_train_batches", type=int, default=0, help="at most N training steps per epoch (0: all)")
    g.add_argument("--limit_val_batches", type=int, default=0, help="at most N evaluation batches (0: all)")

    g = p.add_argument_group("devices and speed")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to train")
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads for this run (default: torch's, one per core); 1 when runs or other jobs share the cores "
        "(two runs with two threads each on 2 cores are about 3x slower than one thread each)",
    )
    g.add_argument(
        "--amp",
        default="none",
        choices=("none", "bf16", "fp16"),
        help="mixed precision (fp16 with loss scaling over both SAM passes; CUDA only)",
    )
    g.add_argument("--channels_last", action="store_true", help="channels-last memory format for model and inputs")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--dist_url", default="env://", help="torch.distributed init method under torchrun")
    g.add_argument("--distributed_val", action="store_true", help="every rank evaluates a shard (else rank 0 all)")
    p.add_argument("--config", default=None, help="YAML file of flag values; flags on the command line override it")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")
    return p


def _show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def flags_markdown() -> str:
    """The flag table of docs/flags.md, generated from the parser (a test keeps the file in step)."""
    parser = build_parser()
    lines = []
    # argparse's own group (--config, --debug) first holds the general options: they read best last.
    for group in [*parser._action_groups[2:], parser._action_groups[1]]:
        actions = [a for a in group._group_actions if a.option_strings and a.dest != "help"]
        if not actions:
            continue
        title = "general" if group is parser._action_groups[1] else group.title
        lines += [f"## {title}", "", "| flag | default | what it does |", "|---|---|---|"]
        for a in actions:
            flag = a.option_strings[0] + ("" if a.nargs == 0 else f" {a.metavar or a.dest.upper()}")
            default = "" if a.default is None or a.default is False else f"`{_show(a.default)}`"
            text = (a.help or "").replace("|", "\\|")
            if a.choices:
                text += f" (one of: {', '.join(map(str, a.choices))})"
            lines.append(f"| `{flag}` | {default} | {text} |")
        lines.append("")
    return "\n".join(lines)
