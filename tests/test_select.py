"""The device top-k against a sort: exact count, and every kept score at least every dropped one."""

import pytest
import torch

from ssam.optim.select import device_top_k_mask, top_k_mask

KINDS = ["normal", "ties", "masked", "negative", "zeros"]


@pytest.mark.parametrize("kind", KINDS)
def test_device_top_k_matches_sorting(kind):
    g = torch.Generator().manual_seed(KINDS.index(kind))
    for _ in range(40):
        n = int(torch.randint(1, 400, (1,), generator=g))
        s = {
            "normal": lambda: torch.randn(n, generator=g),
            "ties": lambda: torch.randint(0, 4, (n,), generator=g).float(),
            "masked": lambda: torch.where(
                torch.rand(n, generator=g) < 0.5, torch.rand(n, generator=g), torch.tensor(float("-inf"))
            ),
            "negative": lambda: -torch.rand(n, generator=g) * 1e3,
            "zeros": lambda: torch.zeros(n),
        }[kind]()
        k = int(torch.randint(0, n + 1, (1,), generator=g))
        m = device_top_k_mask(s, k)
        assert m.dtype == torch.bool and int(m.sum()) == k
        expected = torch.sort(s, descending=True).values
        if 0 < k:
            assert torch.equal(torch.sort(s[m], descending=True).values, expected[:k])


def test_device_and_cpu_selection_pick_the_same_entries():
    """The accelerator path (topk threshold) and the CPU path (numpy partition) break ties alike, by position, with
    -0.0 and +0.0 equal: a mask does not depend on the device it was computed on."""
    g = torch.Generator().manual_seed(7)
    for _ in range(30):
        n = int(torch.randint(1, 2000, (1,), generator=g))
        s = torch.randint(-2, 3, (n,), generator=g).float() * torch.rand(n, generator=g).round()
        s = torch.where(torch.rand(n, generator=g) < 0.3, -s, s)  # many exact zeros of both signs
        k = int(torch.randint(0, n + 1, (1,), generator=g))
        assert torch.equal(device_top_k_mask(s, k), top_k_mask(s, k))


def test_nan_scores_rank_lowest_on_both_paths():
    """A NaN score (from a NaN gradient) must not break the exact count: it ranks lowest, tied with -inf, on the CPU
    path and the accelerator path alike."""
    g = torch.Generator().manual_seed(11)
    for _ in range(30):
        n = int(torch.randint(2, 500, (1,), generator=g))
        s = torch.randn(n, generator=g)
        s[torch.rand(n, generator=g) < 0.3] = float("nan")
        s[torch.rand(n, generator=g) < 0.05] = float("-inf")
        k = int(torch.randint(0, n + 1, (1,), generator=g))
        cpu, dev = top_k_mask(s, k), device_top_k_mask(s, k)
        assert int(cpu.sum()) == k and torch.equal(cpu, dev)
        low = torch.isnan(s) | (s == float("-inf"))
        # Every number above -inf is kept before any NaN is (NaN and -inf tie, by position).
        if k <= int((~low).sum()):
            assert not (cpu & low).any()
        else:
            assert cpu[~low].all()
