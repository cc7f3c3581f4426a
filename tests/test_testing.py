"""bam_fused.testing.compare, the rule that every test and `bam-fused verify` judge results by:
a rule that passed too much would leave all of them unable to fail, so each branch of it is
pinned here at its edges."""

import pytest
import torch

from bam_fused.testing import TOLERANCES, compare

NAN, INF = float("nan"), float("inf")


def f64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_shapes_must_match():
    with pytest.raises(AssertionError, match=r"shape \(2, 3\) != reference shape \(3, 2\)"):
        compare(torch.zeros(2, 3), torch.zeros(3, 2, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_table_bounds_each_element_by_its_own_size(dtype):
    atol, rtol = TOLERANCES[dtype]
    truth = f64(1000.0, 1e-3, -2.0)
    tol = atol + rtol * truth.abs()
    assert compare((truth + 0.5 * tol).to(dtype), truth).passed
    assert compare((truth - 0.9 * tol).to(dtype), truth).passed
    # An exact eager result does not tighten it (that rule is half precision's).
    assert compare((truth + 0.5 * tol).to(dtype), truth, truth.to(dtype)).passed
    # Twice its own tolerance off at the small element: within rtol of the largest one (a rule
    # scaled by the largest element would pass it), not within its own.
    off = truth.clone()
    off[1] += 2 * tol[1]
    result = compare(off.to(dtype), truth)
    assert not result.passed and "FAIL" in str(result)
    assert result.max_abs == pytest.approx(2 * float(tol[1]), rel=1e-3)


def test_an_error_of_exactly_the_tolerance_passes():
    atol = TOLERANCES[torch.float64][0]
    assert compare(f64(atol), f64(0.0)).passed


def test_reported_errors():
    result = compare(torch.tensor([2.25, 1e-6]), f64(2.0, 0.0))
    assert result.max_abs == pytest.approx(0.25)
    assert result.max_rel == pytest.approx(1.0)  # relative to 1e-6 where the truth is 0
    assert result.tolerance == pytest.approx(1e-5 + 1e-5 * 2.0)
    assert not result.passed
    assert "pass" in str(compare(torch.tensor([2.0]), f64(2.0)))


def test_float32_may_be_off_by_twice_eager_where_the_table_fails():
    # Long reductions: summation order alone can exceed the table in float32.
    truth = f64(1.0, 2.0)
    eager = torch.tensor([1.001, 2.0])  # 1e-3 off, far beyond the table
    within = torch.tensor([1.0, 2.002])  # 2e-3 <= 2 * 1e-3 + atol
    beyond = torch.tensor([1.0, 2.0021])
    assert not compare(within, truth).passed
    assert compare(within, truth, eager).passed
    result = compare(beyond, truth, eager)
    assert not result.passed
    assert result.tolerance == pytest.approx(2 * 1e-3 + TOLERANCES[torch.float32][0], rel=1e-4)
    # An eager result within the table does not loosen it.
    assert not compare(within, truth, truth.float()).passed


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_may_be_off_by_twice_eager(dtype):
    atol = TOLERANCES[dtype][0]
    truth = f64(1.0, 2.0, -3.0)  # each exact in both dtypes
    eager = (truth + f64(0.25, 0.0, 0.0)).to(dtype)  # 0.25 off: the bound is 0.5 + atol
    within = (truth + f64(0.0, 0.5, 0.0)).to(dtype)
    beyond = (truth + f64(0.0, 0.5 + 2 * atol, 0.0)).to(dtype)
    assert compare(within, truth, eager).passed
    assert not compare(beyond, truth, eager).passed
    assert not compare(within, truth).passed  # the table alone: atol, rtol 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_allows_one_rounding_at_the_largest_value(dtype):
    # Where eager happens to be exact, a result stored in this dtype may still be one unit in
    # the last place off at the largest value, but not two.
    truth = f64(1.0, 2.0, -64.0)
    ulp = 64.0 * torch.finfo(dtype).eps  # one unit in the last place in [64, 128)
    eager = truth.to(dtype)
    one, two = truth.clone(), truth.clone()
    one[2] -= ulp
    two[2] -= 2 * ulp
    assert ulp > TOLERANCES[dtype][0]  # (so that atol alone would fail it)
    assert compare(one.to(dtype), truth, eager).passed
    assert not compare(two.to(dtype), truth, eager).passed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_eager", [False, True])
def test_nan_and_infinities_must_sit_where_the_truth_has_them(dtype, with_eager):
    truth = f64(1.0, NAN, INF, -INF)
    eager = truth.to(dtype) if with_eager else None
    assert compare(truth.to(dtype), truth, eager).passed
    for index, value in [(0, NAN), (0, INF), (1, 0.0), (1, INF), (2, NAN), (2, -INF), (3, INF), (3, 1.0)]:
        wrong = truth.to(dtype)
        wrong[index] = value
        assert not compare(wrong, truth, eager).passed, (index, value)


def test_empty_tensors_pass():
    result = compare(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.float64), torch.zeros(0, 3))
    assert result.passed and result.max_abs == result.max_rel == 0.0
    assert result.tolerance == TOLERANCES[torch.float32][0]
