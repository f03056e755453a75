"""combine_statuses: every pair against the rule table, and its algebra."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eventmill.services import ProcessStatus, combine_statuses

N = ProcessStatus.INITIALISED
A = ProcessStatus.STARTING
W = ProcessStatus.WAITING
R = ProcessStatus.RUNNING
P = ProcessStatus.STOPPING
S = ProcessStatus.STOPPED
E = ProcessStatus.ERRORED
U = ProcessStatus.UNKNOWN
D = ProcessStatus.DEGRADED

ORDER = [N, A, W, R, P, S, E, U, D]

# Row: the first status; column: the second, in ORDER. Written out by hand from the
# rule table in the docstring, so a change to either shows up here.
EXPECTED = {
    N: [N, A, A, A, P, P, E, U, A],
    A: [A, A, A, A, P, P, E, U, A],
    W: [A, A, W, R, P, P, E, U, D],
    R: [A, A, R, R, P, P, E, U, D],
    P: [P, P, P, P, P, P, E, U, P],
    S: [P, P, P, P, P, S, E, U, P],
    E: [E, E, E, E, E, E, E, E, E],
    U: [U, U, U, U, U, U, E, U, U],
    D: [A, A, D, D, P, P, E, U, D],
}

PAIRS = [
    (first, second, EXPECTED[first][column])
    for first in ORDER
    for column, second in enumerate(ORDER)
]


def test_the_table_covers_every_status() -> None:
    assert set(ORDER) == set(ProcessStatus)
    assert len(PAIRS) == len(ProcessStatus) ** 2


@pytest.mark.parametrize(("first", "second", "expected"), PAIRS)
def test_every_pair(first: ProcessStatus, second: ProcessStatus, expected: ProcessStatus) -> None:
    assert combine_statuses([first, second]) == expected


@pytest.mark.parametrize("status", ORDER)
def test_a_single_status_is_itself(status: ProcessStatus) -> None:
    assert combine_statuses([status]) == status
    assert combine_statuses([status, status, status]) == status


def test_nothing_is_stopped() -> None:
    assert combine_statuses([]) == S


statuses = st.lists(st.sampled_from(ORDER), max_size=6)


@given(statuses, statuses, statuses)
def test_combining_nests(
    first: list[ProcessStatus], second: list[ProcessStatus], third: list[ProcessStatus]
) -> None:
    whole = combine_statuses(first + second + third)
    parts = [combine_statuses(part) for part in (first, second, third) if part]
    assert combine_statuses(parts) == whole
    for permutation in itertools.permutations(parts):
        assert combine_statuses(permutation) == whole
