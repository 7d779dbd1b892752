"""Several processes (torchrun): process group, elastic restarts, and the collectives the trainer needs.

SSAM adds one rule to data-parallel training: every rank must perturb with the same mask. The mask helpers below
build it from sharded work (the Fisher), hand it from rank 0 to the others, and check that ranks agree.
"""

from __future__ import annotations

import datetime
import os
from argparse import Namespace

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import UsageError
from ..optim import SparseSAM
from ..optim.refresh import all_reduce_sum

__all__ = [
    "init_distributed",
    "elastic_restart",
    "pick_device",
    "unwrap",
    "all_reduce_sum",
    "all_reduce_mean",
    "same_on_all_ranks",
    "mask_hash",
    "check_masks_agree",
    "broadcast_masks",
    "weights_agree",
]


def init_distributed(cfg: Namespace) -> tuple[int, int, int]:
    """(rank, world size, local rank); (0, 1, 0) outside torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    backend = "nccl" if use_cuda else "gloo"
    if dist.is_initialized():
        pass
    elif cfg.dist_url == "env://" and "MASTER_ADDR" in os.environ:
        # Keys of a previous torchrun attempt stay in the agent's store; a fresh prefix per attempt keeps a
        # restarted job (--max-restarts) from dialling the dead ranks' addresses.
        rank, attempt = int(os.environ["RANK"]), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            world,
            is_master=(not agent and rank == 0),
            timeout=datetime.timedelta(minutes=10),
        )
        dist.init_process_group(
            backend, store=dist.PrefixStore(f"ssam/attempt{attempt}", store), rank=rank, world_size=world
        )
    else:
        dist.init_process_group(backend, init_method=cfg.dist_url)
    return dist.get_rank(), dist.get_world_size(), local_rank


def elastic_restart() -> bool:
    """True when torchrun --max-restarts relaunched us after a rank died."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def pick_device(cfg: Namespace, local_rank: int) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    if cfg.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a compiled and/or DDP wrapper."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def all_reduce_mean(tensors: list[Tensor]) -> None:
    """Average tensors over ranks in place with one collective (what DDP does to gradients)."""
    if not tensors:
        return
    for t, s in zip(tensors, all_reduce_sum(tensors)):
        t.copy_(s).div_(dist.get_world_size())


def same_on_all_ranks(value: Tensor, world: int) -> bool:
    if world <= 1:
        return True
    gathered = [torch.zeros_like(value) for _ in range(world)]
    dist.all_gather(gathered, value)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def mask_hash(opt: SparseSAM) -> Tensor:
    flat = opt.flat_mask()
    idx = torch.arange(flat.numel(), device=flat.device, dtype=torch.int64)
    # Two position-weighted sums: equal masks give equal pairs; a moved entry changes them.
    return torch.stack([(idx * flat).sum(), ((idx * 2654435761) % 1000000007 * flat).sum()])


def check_masks_agree(opt: SparseSAM, world: int, epoch: int) -> None:
    if not same_on_all_ranks(mask_hash(opt), world):
        raise RuntimeError(
            f"SSAM masks differ across ranks after the update at epoch {epoch}; "
            "refusing to train with inconsistent perturbations"
        )


def broadcast_masks(opt: SparseSAM, world: int) -> None:
    """Rank 0's mask to every rank (SSAM-D with local first passes sees a different gradient on each rank)."""
    if world > 1:
        flat = opt.flat_mask().to(torch.uint8)
        dist.broadcast(flat, 0)
        opt.set_flat_mask(flat.bool())


def weights_agree(model: nn.Module, sparse_opt: SparseSAM | None, world: int) -> bool:
    """Whether every rank holds the same weights (and the same mask, when a sparse optimizer is given)."""
    flat = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    h = torch.stack([flat.sum(), (flat * torch.arange(flat.numel(), device=flat.device)).sum()])
    ok = same_on_all_ranks(h, world)
    if sparse_opt is not None:
        ok = same_on_all_ranks(mask_hash(sparse_opt), world) and ok
    return ok
