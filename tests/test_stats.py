"""Seeds as statistics: the 95% Student-t interval of the mean, and seed counts in matrices."""
import math

import pytest

from backdoor.harness.matrix import MatrixError, parse_seeds
from backdoor.stats import summarize


def test_interval_is_the_student_t_interval_of_the_mean():
    s = summarize([0.2, 0.4, 0.6])
    # mean 0.4, sd 0.2, t(0.975, 2) = 4.3027: half-width 4.3027 * 0.2 / sqrt(3)
    assert s.n == 3 and math.isclose(s.mean, 0.4)
    assert math.isclose(s.half_width, 4.302652729911275 * 0.2 / math.sqrt(3), rel_tol=1e-9)
    assert s.low == 0.0 and math.isclose(s.high, 0.4 + s.half_width)  # clipped to [0, 1] below


def test_one_seed_has_no_interval_and_nothing_gives_none():
    s = summarize([0.7])
    assert (s.n, s.mean, s.half_width, s.low, s.high) == (1, 0.7, None, None, None)
    assert summarize([]) is None and summarize([None]) is None


def test_identical_values_give_a_zero_width_interval():
    s = summarize([0.5] * 5)
    assert s.n == 5 and s.half_width == 0.0 and s.low == s.high == 0.5


@pytest.mark.parametrize("value, seeds", [(5, [0, 1, 2, 3, 4]), ([3, 7], [3, 7]), ("0,1,2", [0, 1, 2]), ("2", [0, 1]), ("7,", [7])])
def test_seed_counts_and_lists(value, seeds):
    assert parse_seeds(value) == seeds


@pytest.mark.parametrize("value", [0, -1, True, [], [0, 0], ["a"], "x", 1.5])
def test_bad_seeds_are_refused(value):
    with pytest.raises(MatrixError, match="is not allowed"):
        parse_seeds(value)
