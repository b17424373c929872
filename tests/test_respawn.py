"""The respawn backoff of the supervisor's children, with lifetimes as plain numbers."""

from __future__ import annotations

from weft.respawn import RESPAWN_BACKOFF_MAX, YOUNG, Backoff


def test_a_child_dying_young_waits_twice_as_long_each_time_up_to_the_cap():
    backoff = Backoff()
    delays = [backoff.delay(lived=0.5) for _ in range(10)]
    assert delays[:4] == [0.2, 0.4, 0.8, 1.6]
    assert delays[-1] == RESPAWN_BACKOFF_MAX and max(delays) == RESPAWN_BACKOFF_MAX


def test_a_child_that_lived_a_while_comes_back_at_once_and_clears_the_count():
    backoff = Backoff()
    backoff.delay(lived=1.0)
    backoff.delay(lived=1.0)
    assert backoff.delay(lived=YOUNG) == 0.0
    assert backoff.delay(lived=1.0) == 0.2  # counting from the start again


def test_reset_forgets_the_failures():
    backoff = Backoff()
    for _ in range(5):
        backoff.delay(lived=0.0)
    backoff.reset()
    assert backoff.delay(lived=0.0) == 0.2
