"""The recency order of published blocks: a doubly linked list of ids, front = least recently used.

It offers the part of ``OrderedDict``'s interface the bookkeeping uses (append by assignment,
``move_to_end``, ``del``, iteration both ways, membership) plus :meth:`insert_before`, which an
``OrderedDict`` lacks: a block committed while decoding goes just before its parent in O(1), where
moving the whole chain to the back would cost O(chain length) per block.
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ["Recency"]


class Recency:
    """Ids in recency order (see module docstring). Not thread-safe: the pool's lock guards it."""

    def __init__(self):
        self._prev: dict[int, int | None] = {}
        self._next: dict[int, int | None] = {}
        self._head: int | None = None
        self._tail: int | None = None

    def __len__(self) -> int:
        return len(self._prev)

    def __contains__(self, i: object) -> bool:
        return i in self._prev

    def __iter__(self) -> Iterator[int]:
        node = self._head
        while node is not None:
            nxt = self._next[node]  # read first: the caller may delete ``node``
            yield node
            node = nxt

    def __reversed__(self) -> Iterator[int]:
        node = self._tail
        while node is not None:
            prv = self._prev[node]
            yield node
            node = prv

    def __setitem__(self, i: int, _value: None) -> None:
        """``order[i] = None``: append ``i`` as the most recently used (moved there if present)."""
        if i in self._prev:
            self._unlink(i)
        self._link(i, self._tail, None)

    def __delitem__(self, i: int) -> None:
        self._unlink(i)

    def move_to_end(self, i: int) -> None:
        if i != self._tail:
            self._unlink(i)
            self._link(i, self._tail, None)

    def insert_before(self, i: int, ref: int) -> None:
        """Put ``i`` (not present) just before ``ref`` (present): used just less recently than ``ref``."""
        self._link(i, self._prev[ref], ref)

    def clear(self) -> None:
        self._prev.clear()
        self._next.clear()
        self._head = self._tail = None

    def _link(self, i: int, prev: int | None, nxt: int | None) -> None:
        self._prev[i], self._next[i] = prev, nxt
        if prev is None:
            self._head = i
        else:
            self._next[prev] = i
        if nxt is None:
            self._tail = i
        else:
            self._prev[nxt] = i

    def _unlink(self, i: int) -> None:
        prev, nxt = self._prev.pop(i), self._next.pop(i)
        if prev is None:
            self._head = nxt
        else:
            self._next[prev] = nxt
        if nxt is None:
            self._tail = prev
        else:
            self._prev[nxt] = prev
