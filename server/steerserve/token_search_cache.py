"""The features API's token-search cache: least recently used searches dropped past a byte budget.

A token search ranks every feature of the asked layers on the workers; the answer is kept for
the next page and holds offset + limit hits per layer (about 27 MB for 8 layers at offset
10,000), so each search is charged its estimated size rather than counted as one entry.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Iterator


class TokenSearchCache:
    def __init__(self) -> None:
        self._entries: OrderedDict[tuple, tuple[list[dict], int]] = OrderedDict()
        self.nbytes = 0

    @staticmethod
    def entry_bytes(hits: list[dict]) -> int:
        """What the hits hold of their own: the list, each hit's dict and numbers (labels and the
        token's text are shared with every other hit)."""
        return sys.getsizeof(hits) + sum(sys.getsizeof(h) + sys.getsizeof(h["index"]) + sys.getsizeof(h["logit"])
                                         for h in hits)

    def get(self, key: tuple) -> list[dict] | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: tuple, hits: list[dict], budget: int) -> None:
        """Keep `hits`, dropping the least recently used until all fit in `budget` bytes (a search
        bigger than the budget is not kept)."""
        if key in self._entries:
            self.nbytes -= self._entries.pop(key)[1]
        size = self.entry_bytes(hits)
        if size > budget:
            return
        self._entries[key] = (hits, size)
        self.nbytes += size
        while self.nbytes > budget:
            self.nbytes -= self._entries.popitem(last=False)[1][1]

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[tuple]:
        return iter(self._entries)

    def values(self) -> Iterator[list[dict]]:
        return (hits for hits, _ in self._entries.values())
