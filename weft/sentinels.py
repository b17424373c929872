"""Named singletons for state machines: the states, events and decisions of `weft.health`,
`weft.outlier` and `weft.adaptive`, as h11 names its states.

A sentinel compares by identity and prints its name, so a transition table reads as a table
and a failing test says ``UNHEALTHY``, not ``2``. `code` is its number in a shared word.
"""

from __future__ import annotations

__all__ = ["Sentinel"]


class Sentinel:
    __slots__ = ("code", "name")

    def __init__(self, name: str, code: int = 0) -> None:
        self.name = name
        self.code = code

    def __repr__(self) -> str:
        return self.name
