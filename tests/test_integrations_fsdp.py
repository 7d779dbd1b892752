"""SAM over FSDP2 (fully_shard) with 2 gloo CPU processes against the same model unsharded.

Dense SAM needs nothing FSDP-specific: parameters and gradients are DTensors sharded on dim 0, and the gradient
norm, the perturbation and the restore run as DTensor operations (the norm's reduction across shards included).
SSAM's masks are plain tensors and do not yet run on sharded parameters (see README, FSDP limits).
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard") or not dist.is_gloo_available():
    pytest.skip("this torch has no fully_shard or no gloo backend", allow_module_level=True)

import ssam  # noqa: E402


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _train(model, steps, rank):
    opt = ssam.create_optimizer(model, "sam-sgd", lr=0.1, momentum=0.9, rho=0.1)
    for step in range(steps):
        # Each rank its own examples: FSDP averages the gradients, the unsharded model sees all of them.
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(2, 4, 6, generator=g), torch.randint(0, 3, (2, 4), generator=g)
        x, y = (x[rank], y[rank]) if rank is not None else (x.reshape(8, 6), y.reshape(8))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.second_step()


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = _net()
        for layer in (model[0], model[2], model):
            fsdp.fully_shard(layer)
        _train(model, 3, rank)
        full = {k: v.full_tensor() for k, v in model.state_dict().items()}
        if rank == 0:
            torch.save(full, out)
    finally:
        dist.destroy_process_group()


def test_sam_over_fully_shard_equals_unsharded(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "sharded.pt"
    mp.spawn(_worker, args=(port, str(out)), nprocs=2)
    ref = _net()
    _train(ref, 3, None)
    got = torch.load(out)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(got[k], v, atol=1e-6, rtol=0, msg=k)
    assert not torch.equal(got["0.weight"], _net().state_dict()["0.weight"])  # it trained
