"""SAM, SSAM-F and SSAM-D over FSDP2 (fully_shard) with 2 gloo CPU processes against the same model unsharded.

One spawn runs all three: parameters are DTensors sharded on dim 0 (uneven here: 5 rows over 2 ranks), the
optimizers work on the local shards with one all-reduce for the norm, and each mask is a global top-k gathered
across the ranks. The references are the same models unsharded, seeing every rank's examples at once.
"""

from __future__ import annotations

import gc
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
from integrations_util import last_value, run_example  # noqa: E402

OPTS = {
    "sam-sgd": {},
    "ssamf-sgd": dict(sparsity=0.6, num_samples=16),
    "ssamd-sgd": dict(sparsity=0.6, seed=3, renormalize=True, T_end=4),
}


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _batch(step, rank):
    """Each rank its own examples: FSDP averages the gradients, the unsharded model sees all of them."""
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(2, 8, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (2, 8), generator=g)
    return (x[rank], y[rank]) if rank is not None else (x.reshape(16, 6), y.reshape(16))


def _sum_over_ranks(tensors):
    for t in tensors:
        dist.all_reduce(t)
    return tensors


def _train(model, name, rank, steps=3):
    opt = ssam.create_optimizer(model, name, lr=0.1, momentum=0.9, rho=0.1, **OPTS[name])
    masks = []
    if name.startswith("ssamf"):  # each rank measures the Fisher of its share; the sums are reduced, as under DDP
        opt.update_mask(model, [_batch(99, rank)], reduce=_sum_over_ranks if rank is not None else None)
        masks.append(opt.flat_mask())
    for step in range(steps):
        x, y = _batch(step, rank)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if name.startswith("ssamd") and step in (0, 2):  # scored by the (averaged) gradient at w, as unsharded
            opt.update_mask(step // 2)
            masks.append(opt.flat_mask())
        opt.first_step(zero_grad=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()  # finishes the step first_step began
    return opt, masks


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        results = {}
        for name in OPTS:
            model = _net()
            for layer in (model[0], model[2], model):
                fsdp.fully_shard(layer)
            opt, masks = _train(model, name, rank)
            if masks:  # each rank's state_dict holds its shards' masks, and loads back into the same layout
                twin = ssam.create_optimizer(model, name, lr=0.1, **OPTS[name])
                twin.load_state_dict(opt.state_dict())
                assert torch.equal(twin.flat_mask(), opt.flat_mask())
            full = {k: v.full_tensor() for k, v in model.state_dict().items()}
            results[name] = (full, masks, opt.mask_stats() if masks else None)
        with pytest.raises(ValueError, match="granularity: got 'channel' with FSDP-sharded parameters"):
            ssam.create_optimizer(model, "ssamd-sgd", lr=0.1, granularity="channel")
        from torch.distributed.tensor import Replicate, distribute_tensor

        replicated = nn.Parameter(distribute_tensor(torch.ones(4, 3), model[0].weight.device_mesh, [Replicate()]))
        with pytest.raises(ValueError, match=r"params: DTensor parameters with placement \(Replicate\(\),\)"):
            ssam.SSAMF([replicated], torch.optim.SGD, lr=0.1)
        ssam.SAM([replicated], torch.optim.SGD, lr=0.1)  # dense SAM runs on DTensor operations there
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()
        gc.collect()  # free gloo objects before interpreter shutdown, where freeing them can abort the process


@pytest.mark.slow
def test_sam_and_ssam_over_fully_shard_equal_unsharded(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "sharded.pt"
    mp.spawn(_worker, args=(port, str(out)), nprocs=2)
    got = torch.load(out)
    for name in OPTS:
        ref = _net()
        opt, masks = _train(ref, name, None)
        weights, sharded_masks, stats = got[name]
        assert len(sharded_masks) == len(masks) == (0 if name == "sam-sgd" else 1 if "ssamf" in name else 2)
        for a, b in zip(sharded_masks, masks):
            assert torch.equal(a, b), name
            assert int(a.sum()) == opt.num_live
        if masks:
            assert stats == opt.mask_stats()
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(weights[k], v, atol=1e-12, rtol=0, msg=f"{name} {k}")
        assert not torch.equal(weights["0.weight"], _net().state_dict()["0.weight"])  # it trained
    if len(masks) == 2:
        assert not torch.equal(masks[0], masks[1])  # SSAM-D's update moved the mask


@pytest.mark.slow
@pytest.mark.parametrize("opt_name", ["ssamd-sgd", "ssamf-sgd"])
def test_example_fsdp_runs(opt_name):
    out = run_example("fsdp_ssam.py", "--opt", opt_name, "--epochs", "2")
    first, last = last_value(out, "loss after epoch")
    assert last < first
    assert last_value(out, "epoch 1 global mask density") == [0.5]
    # Every layer has an even number of rows, so each rank holds half of every tensor: the ranks' densities average
    # to the global one, and the global top-k leaves them uneven.
    line = next(line for line in out.splitlines() if line.startswith("epoch 1 per-rank"))
    per_rank = [float(v) for v in line.split()[-2:]]
    assert sum(per_rank) / 2 == pytest.approx(0.5, abs=1e-9)
    assert per_rank[0] != per_rank[1]
