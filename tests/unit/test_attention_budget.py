"""The shared budget rule: k = round(n r / 2) half-up, exact; local >= 1; total <= n."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flexalisa.attention import make_method
from flexalisa.attention.budget import caching_ratio, half_budget, split_budget


@pytest.mark.parametrize(
    ("sparsity", "num_valid", "num_local", "num_global"),
    [
        (0.8, 1, 1, 0),
        (0.8, 4, 1, 0),  # round(0.4) = 0, but one local token is the floor
        (0.8, 5, 1, 1),  # round(0.5) = 1: exact half rounds up (floats would give 0)
        (0.8, 15, 2, 2),  # round(1.5) = 2
        (0.8, 25, 3, 3),  # round(2.5) = 3, half up, not half-even
        (0.8, 1000, 100, 100),
        (0.5, 2, 1, 1),  # round(0.5) = 1: everything
        (0.5, 3, 1, 1),
        (0.9, 5, 1, 0),
        (0.9, 1024, 51, 51),  # round(51.2)
        (0.0, 1, 1, 0),
        (0.0, 2, 1, 1),
        (0.0, 7, 4, 3),  # k = ceil(7 / 2): all tokens
    ],
)
def test_budget_table(sparsity: float, num_valid: int, num_local: int, num_global: int) -> None:
    local, glob = split_budget(torch.tensor([num_valid]), caching_ratio(sparsity))
    assert (int(local), int(glob)) == (num_local, num_global)


def test_sparsity_is_read_as_its_decimal() -> None:
    assert caching_ratio(0.8) == Fraction(1, 5)
    assert caching_ratio(0.1 + 0.2) == Fraction(7, 10)


@given(st.integers(1, 5000), st.integers(0, 99))
def test_budget_invariants(num_valid: int, percent: int) -> None:
    ratio = caching_ratio(percent / 100)
    n = torch.tensor([num_valid, num_valid + 1])
    k = half_budget(n, ratio)
    exact = Fraction(num_valid) * ratio / 2
    assert exact - Fraction(1, 2) < int(k[0]) <= exact + Fraction(1, 2)  # round half up
    local, glob = split_budget(n, ratio)
    total = local + glob
    assert (local >= 1).all() and (total <= n).all() and (glob <= local).all()
    assert int(total[1]) - int(total[0]) in (0, 1, 2)  # k grows by one: local and global both
    assert int(k[1]) - int(k[0]) in (0, 1)
    if percent == 0:
        assert (total == n).all()


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_sparsity_is_rejected(bad: float) -> None:
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        make_method("swa", bad)


def test_unknown_method_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown sparsity method 'swa2'"):
        make_method("swa2", 0.5)
