"""The graph cache of HessianOperator: cached, partly cached and rebuilt products all equal the exact H v,
and no result depends on the batching, the vectors per pass or the cache bound beyond float rounding."""

import numpy as np
import pytest
import torch

from ssam.analysis import HessianOperator, analysis_mode, hessian_density, hessian_eigenvalues, hessian_trace
from ssam.errors import UsageError
from test_hessian import exact_hessian, make

pytestmark = pytest.mark.usefixtures("one_thread")

UNBOUNDED = 1 << 50


def operator(model, loss_fn, batches, graph_memory):
    params = list(model.parameters())
    ctx = analysis_mode(model, params)
    dev = ctx.__enter__()
    return ctx, HessianOperator(model, loss_fn, batches, params, dev, graph_memory=graph_memory)


def per_batch_bytes(model, loss_fn, batches):
    """Bytes each batch's graph is counted at, from operators that each see one batch."""
    sizes = []
    for b in batches:
        ctx, op = operator(model, loss_fn, [b], UNBOUNDED)
        op(op.random(torch.Generator().manual_seed(0)))
        sizes.append(op.graph_bytes)
        op.close()
        ctx.__exit__(None, None, None)
    return sizes


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_products_equal_exact_whatever_the_cache_bound(kind):
    model, loss_fn, batches = make(kind)
    H = exact_hessian(model, loss_fn, batches)
    sizes = per_batch_bytes(model, loss_fn, batches)
    assert all(s > 0 for s in sizes)
    gen = torch.Generator().manual_seed(1)
    vs = [torch.randn(H.shape[0], generator=gen, dtype=torch.float64) for _ in range(3)]
    # all cached, only the first batch cached, none cached
    for bound, cached in ((UNBOUNDED, 3), (sizes[0], 1), (0, 0)):
        ctx, op = operator(model, loss_fn, batches, bound)
        try:
            for _ in range(2):  # the second round runs on whatever the first one kept
                for v, hv in zip(vs, op.matvec(vs)):
                    np.testing.assert_allclose(hv.numpy(), (H @ v).numpy(), rtol=1e-9, atol=1e-12)
            assert op.cached_batches == cached
            assert op.rebuilds == 3 + (3 - cached)  # each built once, then only the uncached ones again
            assert op.graph_bytes == sum(sizes[:cached])
            assert op.calls == 6
        finally:
            op.close()
            ctx.__exit__(None, None, None)


def test_cached_and_rebuilt_give_the_same_estimates():
    model, loss_fn, batches = make("conv")
    a = hessian_eigenvalues(model, loss_fn, batches, top_k=3)
    b = hessian_eigenvalues(model, loss_fn, batches, top_k=3, graph_memory=0)
    np.testing.assert_allclose(a, b, rtol=1e-12)
    t1 = hessian_trace(model, loss_fn, batches, max_iter=12, tol=0)
    t2 = hessian_trace(model, loss_fn, batches, max_iter=12, tol=0, graph_memory=0)
    np.testing.assert_allclose(t1, t2, rtol=1e-12)
    d1 = hessian_density(model, loss_fn, batches, n_iter=8, return_nodes=True)[2]
    d2 = hessian_density(model, loss_fn, batches, n_iter=8, return_nodes=True, graph_memory=0)[2]
    np.testing.assert_allclose(d1, d2, rtol=1e-10)


def test_trace_samples_do_not_depend_on_vectors_per_pass_or_batching():
    model, loss_fn, batches = make("mlp")
    whole = [(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))]
    ref = hessian_trace(model, loss_fn, batches, max_iter=9, tol=0, vectors_per_pass=1, seed=4)
    assert ref[2] == 9  # tol=0: exactly max_iter samples
    for vpp, data, bound in ((4, batches, None), (9, batches, 0), (2, whole, None), (5, whole, 0)):
        got = hessian_trace(model, loss_fn, data, max_iter=9, tol=0, vectors_per_pass=vpp, seed=4, graph_memory=bound)
        np.testing.assert_allclose(got, ref, rtol=1e-10)
    # ... and the mean of the samples is the Hutchinson estimate of the exact trace.
    exact = float(torch.trace(exact_hessian(model, loss_fn, batches)))
    assert abs(ref[0] - exact) <= 4 * ref[1]


def test_graph_memory_is_checked():
    model, loss_fn, batches = make("mlp")
    for bad in (-1, "1G", True):
        with pytest.raises(UsageError, match="graph_memory"):
            hessian_eigenvalues(model, loss_fn, batches, graph_memory=bad)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_values_only_stop_as_accurate_in_fewer_products(kind):
    # Without eigenvectors Lanczos stops on the error bound of the VALUES (residual²/gap), which must
    # still hold against the exact spectrum, in no more products than the residual rule.
    model, loss_fn, batches = make(kind)
    exact = torch.linalg.eigvalsh(exact_hessian(model, loss_fn, batches)).flip(0)[:2].numpy()
    for tol in (1e-3, 1e-6):
        counts = []
        for vectors in (False, True):
            n = [0]
            out = hessian_eigenvalues(
                model,
                loss_fn,
                batches,
                top_k=2,
                tol=tol,
                return_eigenvectors=vectors,
                progress=lambda k: n.__setitem__(0, n[0] + k),
            )
            vals = out[0] if vectors else out
            assert np.all(np.abs(np.asarray(vals) - exact) <= tol * np.abs(exact) + 1e-12), (tol, vectors)
            counts.append(n[0])
        assert counts[0] <= counts[1]
