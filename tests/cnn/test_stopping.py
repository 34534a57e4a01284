"""A stop request is honoured at the next safe point, with the exit code of SIGTERM."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cnn import stopping


@pytest.fixture
def cleared() -> Iterator[None]:
    stopping._requested.clear()
    yield
    stopping._requested.clear()


def test_check_raises_only_once_a_stop_was_requested(cleared: None) -> None:
    stopping.check()  # nothing asked: the work goes on
    stopping.request_stop()
    assert stopping.requested()
    with pytest.raises(SystemExit) as stopped:
        stopping.check()
    assert stopped.value.code == stopping.TERMINATED == 143
