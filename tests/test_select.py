"""The device top-k against a sort: exact count, and every kept score at least every dropped one."""
import pytest
import torch

from ssam.optim.select import radix_top_k_mask


@pytest.mark.parametrize("kind", ["normal", "ties", "masked", "negative", "zeros"])
def test_radix_top_k_matches_sorting(kind):
    g = torch.Generator().manual_seed(hash(kind) % 2**31)
    for _ in range(40):
        n = int(torch.randint(1, 400, (1,), generator=g))
        s = {
            "normal": lambda: torch.randn(n, generator=g),
            "ties": lambda: torch.randint(0, 4, (n,), generator=g).float(),
            "masked": lambda: torch.where(torch.rand(n, generator=g) < 0.5, torch.rand(n, generator=g),
                                          torch.tensor(float("-inf"))),
            "negative": lambda: -torch.rand(n, generator=g) * 1e3,
            "zeros": lambda: torch.zeros(n),
        }[kind]()
        k = int(torch.randint(0, n + 1, (1,), generator=g))
        m = radix_top_k_mask(s, k)
        assert m.dtype == torch.bool and int(m.sum()) == k
        expected = torch.sort(s, descending=True).values
        if 0 < k:
            assert torch.equal(torch.sort(s[m], descending=True).values, expected[:k])
