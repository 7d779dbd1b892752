"""Mask granularity helpers (ssam.optim.groups) against hand-computed cases and slow one-by-one references."""

import math

import numpy as np
import pytest
import torch

from ssam.optim.dropgrow import group_drop_grow, nm_drop_grow
from ssam.optim.groups import (
    Granularity,
    best_first_fit,
    cost_aware_cut,
    group_means,
    group_owner,
    group_sizes,
    nm_mask,
    parse_granularity,
    structured_mask,
)


# ------------------------------------------------------------------ parsing
@pytest.mark.parametrize(
    "value, expected",
    [
        ("element", Granularity("element")),
        ("channel", Granularity("channel")),
        (" Tensor ", Granularity("tensor")),
        ("2:4", Granularity("nm", 2, 4)),
        ("1:8", Granularity("nm", 1, 8)),
        ("4:16", Granularity("nm", 4, 16)),
    ],
)
def test_parse_granularity_accepts(value, expected):
    g = parse_granularity(value)
    assert g == expected and parse_granularity(g) is g
    assert str(g) == value.strip().lower()


@pytest.mark.parametrize(
    "value", ["3:2", "0:4", "4:4", "2:x", "2:4:8", ":4", "-1:4", "2.0:4", "elements", "", None, 4, 0.5]
)
def test_parse_granularity_rejects(value):
    with pytest.raises(ValueError, match=r"^granularity: got .*allowed: 'element', 'channel', 'tensor', or 'N:M'") as e:
        parse_granularity(value)
    assert repr(value) in str(e.value) and "\n" not in str(e.value)


def test_implied_sparsity():
    assert parse_granularity("2:4").implied_sparsity == 0.5
    assert parse_granularity("1:8").implied_sparsity == 0.875
    assert parse_granularity("tensor").implied_sparsity is None


# ------------------------------------------------------------------ best-first fit
def fit_reference(keys, sizes, budget, among=None):
    """The rule read literally: best first (NaN lowest, ties by position), take each group that still fits."""
    idx = [i for i in range(len(keys)) if among is None or among[i]]
    rank = [(-(k if not math.isnan(k) else -math.inf), i) for i, k in zip(idx, (keys[i] for i in idx))]
    left, chosen = budget, np.zeros(len(keys), dtype=bool)
    for _, i in sorted(rank):
        if sizes[i] <= left:
            chosen[i] = True
            left -= sizes[i]
    return chosen


def test_best_first_fit_hand_example():
    # best first: 5 fits (3 left), 4 does not and is skipped, 2 fits (1 left), 1 fits: 8 of 8 live.
    keys, sizes = np.array([3.0, 2.0, 1.0, 0.5]), np.array([5, 4, 2, 1])
    assert best_first_fit(keys, sizes, 8).tolist() == [True, False, True, True]
    # budget 7: 5 (2 left), skip 4, 2 (0 left), 1 does not fit: 7 live
    assert best_first_fit(keys, sizes, 7).tolist() == [True, False, True, False]
    # ties by position: the earlier of two equal keys goes first
    assert best_first_fit(np.array([1.0, 1.0]), np.array([3, 3]), 4).tolist() == [True, False]
    # NaN ranks lowest; nothing fits a zero budget
    assert best_first_fit(np.array([np.nan, 0.0]), np.array([2, 2]), 2).tolist() == [False, True]
    assert not best_first_fit(keys, sizes, 0).any()


def test_best_first_fit_matches_one_by_one_loop():
    rng = np.random.default_rng(0)
    for trial in range(400):
        g = int(rng.integers(1, 30))
        keys = rng.integers(0, 5, g).astype(float) if trial % 2 else rng.standard_normal(g)
        keys[rng.random(g) < 0.1] = np.nan
        sizes = rng.integers(1, 12, g)
        budget = int(rng.integers(0, sizes.sum() + 2))
        among = rng.random(g) < 0.7 if trial % 3 == 0 else None
        got = best_first_fit(keys, sizes, budget, among)
        assert got.tolist() == fit_reference(keys, sizes, budget, among).tolist()
        assert sizes[got].sum() <= budget


# ------------------------------------------------------------------ channel and tensor groups
SHAPES = [(2, 3), (3,), (2, 1, 2, 2), ()]


def planted_scores():
    return [
        torch.tensor([[1.0, 1.0, 1.0], [9.0, 0.0, 0.0]]),  # row means 1, 3; tensor mean 2
        torch.tensor([0.5, 4.0, 2.5]),  # entries on their own; tensor mean 7/3
        torch.arange(8.0).reshape(2, 1, 2, 2),  # row means 1.5, 5.5; tensor mean 3.5
        torch.tensor(10.0),
    ]  # one entry


def test_group_layout_follows_flat_order():
    assert group_sizes(SHAPES, "channel").tolist() == [3, 3, 1, 1, 1, 4, 4, 1]
    assert group_owner(SHAPES, "channel").tolist() == [0, 0, 1, 1, 1, 2, 2, 3]
    assert group_sizes(SHAPES, "tensor").tolist() == [6, 3, 8, 1]
    assert group_sizes([(0, 3), (4,)], "channel").tolist() == [1, 1, 1, 1]  # an empty tensor has no group
    np.testing.assert_allclose(group_means(planted_scores(), "channel"), [1, 3, 0.5, 4, 2.5, 1.5, 5.5, 10])
    np.testing.assert_allclose(group_means(planted_scores(), "tensor"), [2, 7 / 3, 3.5, 10])


def test_channel_mask_hand_example():
    # Best first by mean: scalar 10 (1; 6 left), row 5.5 (4; 2 left), 4.0 (1; 1 left), row 3 (3) does not fit,
    # 2.5 (1; 0 left): 7 of int(18 * 0.4) = 7 places.
    mask = structured_mask(planted_scores(), "channel", budget=7)
    expected = [0, 0, 0, 0, 0, 0] + [0, 1, 1] + [0] * 4 + [1] * 4 + [1]
    assert mask.dtype == torch.bool and mask.tolist() == [bool(v) for v in expected]


def test_tensor_mask_hand_example():
    # Best first by mean: scalar 10 (1; 8 left), conv 3.5 (8; 0 left), the others do not fit: 9 of 9 places.
    assert structured_mask(planted_scores(), "tensor", budget=9).tolist() == [False] * 9 + [True] * 9
    # budget 8: scalar (7 left), conv (8) skipped, bias 7/3 (3; 4 left), matrix 2 (6) skipped: 4 live
    expected = [False] * 6 + [True] * 3 + [False] * 8 + [True]
    assert structured_mask(planted_scores(), "tensor", budget=8).tolist() == expected


def test_structured_masks_never_exceed_the_budget():
    g = torch.Generator().manual_seed(1)
    shapes = [(8, 3, 3, 3), (8,), (8,), (16, 8, 3, 3), (16,), (10, 16), (10,)]
    n = sum(math.prod(s) for s in shapes)
    for kind in ("channel", "tensor"):
        for sparsity in (0.0, 0.3, 0.5, 0.9, 0.99):
            for cost_aware in (False, True):
                scores = [torch.rand(s, generator=g) for s in shapes]
                budget = int(n * (1 - sparsity))
                mask = structured_mask(scores, kind, budget, cost_aware)
                assert mask.numel() == n and int(mask.sum()) <= budget
                # whole groups only
                sizes = group_sizes(shapes, kind)
                per_group = torch.split(mask, sizes.tolist())
                assert all(bool(p.all()) or not bool(p.any()) for p in per_group)


# ------------------------------------------------------------------ cost-aware cut
def test_cost_aware_cut_hand_example():
    # Four tensors of 10, 10, 10, 2 entries, best score first. Budget 12: the full fit keeps tensors 0 and 3 (12);
    # half the budget is 6. Cut 3 keeps 2 entries (< 6); cut 2 keeps tensors 2 and 3 (12 >= 6): the cut is 2.
    keys, sizes, owner = np.array([4.0, 3.0, 2.0, 1.0]), np.array([10, 10, 10, 2]), np.arange(4)
    assert cost_aware_cut(keys, sizes, owner, 12) == 2
    scores = [torch.full((10,), 4.0), torch.full((10,), 3.0), torch.full((10,), 2.0), torch.full((2,), 1.0)]
    assert structured_mask(scores, "tensor", 12, cost_aware=True).tolist() == [False] * 20 + [True] * 12
    # when even the full fit keeps less than half the budget, the cut must keep as much as it
    assert cost_aware_cut(np.array([1.0, 2.0]), np.array([3, 50]), np.arange(2), 40) == 0


def test_cost_aware_keeps_half_the_budget_and_goes_no_deeper():
    rng = np.random.default_rng(3)
    for _ in range(100):
        t = int(rng.integers(1, 8))
        sizes = rng.integers(1, 20, t)
        keys = rng.standard_normal(t)
        owner = np.arange(t)
        budget = int(rng.integers(0, sizes.sum() + 1))
        cut = cost_aware_cut(keys, sizes, owner, budget)
        full = sizes[fit_reference(keys, sizes, budget)].sum()
        kept = sizes[fit_reference(keys, sizes, budget, owner >= cut)].sum()
        assert kept >= min(full, (budget + 1) // 2)
        for later in range(cut + 1, t):  # no later cut would have kept enough
            assert sizes[fit_reference(keys, sizes, budget, owner >= later)].sum() < min(full, (budget + 1) // 2)


# ------------------------------------------------------------------ N:M
def nm_reference(score, n, m):
    """Loop over output rows and runs of m in the logical (out, reduction) view."""
    flat = score.reshape(score.shape[0], -1).tolist()
    out = []
    for row in flat:
        for start in range(0, len(row), m):
            run = row[start : start + m]
            best = sorted(range(m), key=lambda j: (-run[j], j))[:n]
            out.extend(j in best for j in range(m))
    return torch.tensor(out).reshape(score.shape)


@pytest.mark.parametrize(
    "shape, channels_last",
    [((6, 8), False), ((4, 2, 2, 2), False), ((8, 4, 3, 3), False), ((4, 2, 2, 2), True), ((8, 4, 3, 3), True)],
)
def test_nm_mask_follows_planted_scores(shape, channels_last):
    out, red = shape[0], math.prod(shape[1:])
    # Planted: in row o, the run positions j with (o + j) % 4 in {0, 1} score high; ties elsewhere are by position.
    j = torch.arange(red) % 4
    planted = torch.stack([(((o + j) % 4) < 2).float() * 10 + torch.arange(red) * 1e-3 for o in range(out)])
    score = planted.reshape(shape)
    if channels_last:
        score = score.contiguous(memory_format=torch.channels_last)
        assert not score.is_contiguous()
    mask = nm_mask([score], 2, 4).reshape(shape)
    expected = (((torch.arange(out)[:, None] + j) % 4) < 2).reshape(shape)
    assert torch.equal(mask, expected)
    assert torch.equal(mask, nm_reference(score, 2, 4))
    assert torch.equal(mask.reshape(-1, 4).sum(1), torch.full((mask.numel() // 4,), 2))
    if len(shape) == 4:
        # The journal code's reading: scores as (in*kh*kw, out), the mask viewed back without a transpose.
        wrong = nm_reference(score.reshape(out, red).t().contiguous().reshape(red, out), 2, 4).reshape(shape)
        assert not torch.equal(wrong, expected)


def test_nm_mask_random_scores_match_reference_with_ties():
    g = torch.Generator().manual_seed(5)
    for shape in [(5, 12), (3, 4, 2, 2), (7, 16)]:
        for n, m in [(1, 4), (2, 4), (3, 4), (1, 2), (2, 8)]:
            if math.prod(shape[1:]) % m:
                continue
            score = torch.randint(0, 3, shape, generator=g).float()
            assert torch.equal(nm_mask([score], n, m).reshape(shape), nm_reference(score, n, m))


def test_nm_mask_vectors_fully_live_and_odd_reduction_elementwise():
    g = torch.Generator().manual_seed(6)
    stem = torch.rand(8, 3, 3, 3, generator=g)  # reduction 27: not a multiple of 4
    bias, bn = torch.rand(8, generator=g), torch.rand(8, generator=g)
    lin = torch.rand(4, 8, generator=g)
    mask = nm_mask([stem, bias, lin, bn], 2, 4)
    m_stem, m_bias, m_lin, m_bn = torch.split(mask, [216, 8, 32, 8])
    assert m_bias.all() and m_bn.all()
    k = 216 * 2 // 4
    kth = stem.reshape(-1).sort(descending=True).values[k - 1]
    assert int(m_stem.sum()) == k and torch.equal(m_stem, stem.reshape(-1) >= kth)
    assert torch.equal(m_lin.reshape(4, 8), nm_reference(lin, 2, 4))


# ------------------------------------------------------------------ SSAM-D updates
def drop_grow_reference(live, shapes, kind, drop, grow, budget, rate, grow_from=0):
    sizes = group_sizes(shapes, kind).tolist()
    owner = group_owner(shapes, kind).tolist()
    starts = np.cumsum([0] + sizes[:-1]).tolist()
    lv = [bool(live[s]) for s in starts]
    dk = [float(drop[s : s + z].double().mean()) for s, z in zip(starts, sizes)]
    gk = [float(grow[s : s + z].double().mean()) for s, z in zip(starts, sizes)]
    n_live = sum(lv)
    n_die = min(n_live - int(n_live * (1 - rate)), len(lv) - n_live)
    dying = sorted((i for i in range(len(lv)) if lv[i]), key=lambda i: (dk[i], i))[:n_die]
    survive = [lv[i] and i not in dying for i in range(len(lv))]
    may = [not lv[i] and owner[i] >= grow_from for i in range(len(lv))]
    grown = fit_reference(np.array(gk), np.array(sizes), budget - sum(z for z, s in zip(sizes, survive) if s), may)
    return torch.tensor(np.repeat([a or b for a, b in zip(survive, grown)], sizes))


@pytest.mark.parametrize("kind", ["channel", "tensor"])
def test_group_drop_grow_matches_reference(kind):
    g = torch.Generator().manual_seed(7)
    shapes = [(4, 3), (4,), (6, 4), (6,), (2, 6)]
    n = sum(math.prod(s) for s in shapes)
    for trial in range(30):
        budget = int(n * float(torch.rand(1, generator=g)))
        live = structured_mask([torch.rand(s, generator=g) for s in shapes], kind, budget)
        drop, grow = torch.rand(n, generator=g), torch.rand(n, generator=g)
        rate = float(torch.rand(1, generator=g))
        grow_from = trial % 3
        new = group_drop_grow(live, shapes, kind, drop, grow, budget, rate, grow_from)
        assert torch.equal(new, drop_grow_reference(live, shapes, kind, drop, grow, budget, rate, grow_from))
        assert int(new.sum()) <= budget


def nm_drop_grow_reference(live, shapes, n, m, drop, grow, rate):
    """One by one: live entries die lowest drop first while their block has room to regrow them."""
    blocks, offset = [], 0
    for s in shapes:
        numel = math.prod(s)
        if len(s) >= 2:
            size = m if (numel // s[0]) % m == 0 else numel
            keep = n if size == m else numel * n // m
            blocks += [(start, size, keep) for start in range(offset, offset + numel, size)]
        offset += numel
    block_of = {i: b for b, (start, size, _) in enumerate(blocks) for i in range(start, start + size)}
    live_entries = [i for i in block_of if live[i]]
    n_die = len(live_entries) - int(len(live_entries) * (1 - rate))
    killed = [0] * len(blocks)
    died = set()
    for i in sorted(live_entries, key=lambda i: (float(drop[i]), i)):
        if len(died) == n_die:
            break
        b = block_of[i]
        if killed[b] < min(blocks[b][2], blocks[b][1] - blocks[b][2]):
            killed[b] += 1
            died.add(i)
    out = live.clone()
    for i in died:
        out[i] = False
    for b, (start, size, _) in enumerate(blocks):
        dead = [i for i in range(start, start + size) if not live[i]]
        for i in sorted(dead, key=lambda i: (-float(grow[i]), i))[: killed[b]]:
            out[i] = True
    return out


def test_nm_drop_grow_matches_reference_and_keeps_the_pattern():
    g = torch.Generator().manual_seed(8)
    shapes = [(4, 3, 1, 1), (4,), (6, 8), (6,), (3, 12)]
    n_total = sum(math.prod(s) for s in shapes)
    for n, m in [(2, 4), (1, 4), (3, 4)]:
        for _ in range(10):
            live = nm_mask([torch.rand(s, generator=g) for s in shapes], n, m)
            drop = torch.randint(0, 4, (n_total,), generator=g).float()  # ties
            grow = torch.rand(n_total, generator=g)
            rate = float(torch.rand(1, generator=g))
            new = nm_drop_grow(live, shapes, n, m, drop, grow, rate)
            assert torch.equal(new, nm_drop_grow_reference(live, shapes, n, m, drop, grow, rate))
            assert int(new.sum()) == int(live.sum())
            lin = new[12 + 4 : 12 + 4 + 48].reshape(-1, m)
            assert torch.equal(lin.sum(1), torch.full((lin.shape[0],), n))
