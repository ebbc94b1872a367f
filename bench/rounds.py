"""The order in which the bench takes its contenders' rounds."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")


def mirrored(contenders: Sequence[T], rounds: int) -> Iterator[T]:
    """Each contender once per round, rounds alternately in the given order and reversed (A B C, C B A, ...).

    This box's speed drifts by 10-25% within a minute. Taken one after the other, each contender would be
    measured on a slightly different machine; taken in turn and mirrored, all see the same drift on average
    (a steady drift cancels exactly).
    """
    for number in range(rounds):
        yield from contenders if number % 2 == 0 else reversed(contenders)
