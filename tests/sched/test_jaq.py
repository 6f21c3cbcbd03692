"""JAQ as pure functions: against float64 arithmetic written out here."""

from __future__ import annotations

import math

import pytest
import torch

from qdiff.errors import QdiffError
from qdiff.sched.jaq import alignment_term, jaq, jaq_per_prompt, quality_term


def test_jaq_matches_hand_computation():
    a, q = [30.0, 25.5, 0.0], [0.7, 0.4, 0.55]
    expected = sum(math.log(max(v, 1e-6)) for v in a) / 3 + 2.0 * sum(q) / 3
    got = jaq(torch.tensor(a), torch.tensor(q))
    assert got.dtype == torch.float64
    assert abs(got.item() - expected) < 1e-6  # float32 inputs, float64 math
    assert (
        abs(jaq(torch.tensor(a), torch.tensor(q), k=0.5, log_alignment=False).item() - (55.5 / 3 + 0.5 * 1.65 / 3))
        < 1e-5
    )
    assert torch.allclose(jaq_per_prompt(torch.tensor(a), torch.tensor(q)).mean(), got)


def test_terms_and_monotonicity():
    assert alignment_term(torch.tensor([math.e, math.e])).item() == pytest.approx(1.0)
    assert quality_term(torch.tensor([1.0, 3.0])).item() == 2.0
    base = jaq(torch.tensor([20.0, 20.0]), torch.tensor([0.5, 0.5]))
    assert jaq(torch.tensor([21.0, 20.0]), torch.tensor([0.5, 0.5])) > base  # better alignment -> higher JAQ
    assert jaq(torch.tensor([20.0, 20.0]), torch.tensor([0.6, 0.5])) > base  # better quality -> higher JAQ


def test_errors():
    with pytest.raises(QdiffError, match="differ"):
        jaq(torch.ones(2), torch.ones(3))
    with pytest.raises(QdiffError, match="NaN"):
        jaq(torch.tensor([float("nan")]), torch.ones(1))
    with pytest.raises(QdiffError, match="1-D"):
        jaq(torch.ones(2, 2), torch.ones(2, 2))
