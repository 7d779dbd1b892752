"""Sparse SAM over FSDP2: a small model wrapped with ``torch.distributed.fsdp.fully_shard``, trained with SSAM-D
(or SSAM-F, SAM) by 2 CPU processes over gloo. Each rank perturbs its own shards; the mask is one global top-k over
the whole model, so every rank holds the rows of the same mask an unsharded run would build.

    python examples/integrations/fsdp_ssam.py                      # spawns 2 processes on 127.0.0.1
    python examples/integrations/fsdp_ssam.py --opt ssamf-sgd
    torchrun --nproc_per_node 2 examples/integrations/fsdp_ssam.py  # or let torchrun start them

What works (``ssam.optim.sharded``): parameters sharded on dim 0 (fully_shard's default, Shard(0)) over one 1-D
mesh, element granularity; create the optimizer after fully_shard, and seed every rank the same.
"""

import argparse
import gc
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import TensorDataset

import ssam


def synthetic(n=512):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=g)
    y = (x[:, :4] @ torch.randn(4, 4, generator=g)).argmax(1)
    return x, y


def sum_over_ranks(tensors):
    """SSAM-F's reduce: each rank measures the Fisher of its own examples; every rank builds the mask on the sum."""
    for t in tensors:
        dist.all_reduce(t)
    return tensors


def local_density(opt):
    """Fraction of this rank's shard entries that are perturbed (``mask_density()`` is the global one)."""
    masks = [opt.state[p]["mask"] for p in opt.mask_params()]
    return sum(int(m.sum()) for m in masks) / max(1, sum(m.numel() for m in masks))


def train(args):
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial weights on every rank: fully_shard keeps each rank's rows of them
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    for layer in (model[0], model[2], model[4], model):  # each Linear its own unit, then the root
        fully_shard(layer)
    sparse = {"sam": {}, "ssamf": dict(sparsity=0.5, num_samples=32), "ssamd": dict(sparsity=0.5, seed=0)}
    opt = ssam.create_optimizer(  # after fully_shard: the optimizer must see the DTensor parameters
        model, args.opt, lr=args.lr, momentum=0.9, rho=0.05, **sparse[args.opt.split("-")[0]]
    )
    mask_refresh = getattr(opt, "mask_refresh", None)

    x_all, y_all = synthetic()
    x, y = x_all[rank::world], y_all[rank::world]  # each rank its own examples, as a DistributedSampler would
    for epoch in range(args.epochs):
        if mask_refresh == "before_epoch":  # SSAM-F
            opt.refresh_mask(epoch, model=model, data=TensorDataset(x, y), reduce=sum_over_ranks)
        total = torch.zeros(2)
        for i, start in enumerate(range(0, len(y), args.batch_size)):
            xb, yb = x[start : start + args.batch_size], y[start : start + args.batch_size]
            scored = i == 0 and mask_refresh == "first_backward"
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()  # FSDP reduce-scatters: each rank's shard holds the gradient averaged over the ranks
            if scored:  # SSAM-D: the mask moves by the averaged gradient, the same on every rank
                opt.refresh_mask(epoch)

            def closure():
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                return loss

            opt.step(closure)  # perturb the local shards, pass two at w + e, restore, SGD step
            total += torch.tensor([float(loss.detach()) * len(yb), len(yb)])
        dist.all_reduce(total)
        density = opt.mask_density() if hasattr(opt, "mask_density") else 1.0  # a collective: every rank calls it
        per_rank = [None] * world
        dist.all_gather_object(per_rank, local_density(opt) if hasattr(opt, "mask_params") else 1.0)
        if rank == 0:
            print(f"epoch {epoch} per-rank mask density " + " ".join(f"{d:.3f}" for d in per_rank))
            print(f"epoch {epoch} global mask density {density:.3f}")
            print(f"loss after epoch {epoch + 1} {float(total[0] / total[1]):.4f}")


def run(args, **init):
    dist.init_process_group("gloo", **init)
    try:
        train(args)
    finally:
        dist.destroy_process_group()
        # What FSDP leaves in reference cycles would otherwise be freed during interpreter exit, which at times
        # aborted the process in gloo ("terminate called without an active exception"); free it now.
        gc.collect()


def worker(rank, world, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    run(args, rank=rank, world_size=world)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--opt", default="ssamd-sgd", help="ssamd-sgd, ssamf-sgd, sam-sgd ...")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch_size", type=int, default=32, help="per rank")
    ap.add_argument("--nprocs", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)  # several CPU processes on one machine
    if "RANK" in os.environ:  # started by torchrun
        run(args)
    else:
        mp.spawn(worker, args=(args.nprocs, free_port(), args), nprocs=args.nprocs)


if __name__ == "__main__":
    main()
