"""What a worker keeps for the API to take (captures and traces, gate reports, refused specs),
held within one byte budget (--max-worker-store-mib).

These results live in the worker's host memory, outside vLLM's memory profile, from the step
that records them until the API takes them (server/steerserve/steering/worker_takes.py). So:
  * every entry is charged its (estimated) bytes against the budget;
  * the requests recording under a key are its owners: an entry with a running owner is live
    and never dropped to make room;
  * once every owner has finished, the entry waits for its take; the API also takes (discards)
    what it asked for on every path where the response does not read it (client gone, error
    status, cancellation), and an entry still untaken FINISHED_SECONDS later is dropped, as is
    the oldest finished entry whenever a live one needs its room;
  * a discard can reach the worker before its request records (vLLM may go on running a request
    whose handler was cancelled): the key is then remembered as discarded, and what its requests
    record later is dropped, until they finish (or FINISHED_SECONDS pass, if none ever runs);
  * a live entry that cannot grow within the budget stops recording and is marked full: its
    take answers StoreFull's marker, which the API turns into a 503 for that request, never a
    silently shortened result.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from steerserve_sae.protocol.rpc import FULL_MARKER, Wanted

FINISHED_SECONDS = 60.0  # an untaken entry of finished requests is kept this long at most


@dataclass
class _Entry:
    value: Any
    nbytes: int = 0
    full: bool = False  # outgrew the budget: recording stopped, the take reports it


class WorkerStore:
    def __init__(self, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self.held_bytes = 0
        self.full_total = 0  # entries that outgrew the budget
        self._clock = clock
        self._entries: dict[Wanted, _Entry] = {}
        self._owners: dict[Wanted, set[str]] = {}  # live requests recording under a key
        self._keys_of: dict[str, list[Wanted]] = {}  # a live request's keys
        self._finished: OrderedDict[Wanted, float] = OrderedDict()  # entries of finished requests, oldest first
        self._discarded: OrderedDict[Wanted, float] = OrderedDict()  # keys whose later records are dropped

    @property
    def num_entries(self) -> int:
        return len(self._entries)

    def own(self, req_id: str, key: Wanted) -> None:
        """`req_id`, running, may record under `key`."""
        self._owners.setdefault(key, set()).add(req_id)
        self._keys_of.setdefault(req_id, []).append(key)
        self._finished.pop(key, None)

    def finish(self, req_ids) -> None:
        """These requests finished: entries no running request owns start waiting for their take."""
        now = self._clock()
        for req_id in req_ids:
            for key in self._keys_of.pop(req_id, ()):
                owners = self._owners.get(key)
                if owners is None:
                    continue
                owners.discard(req_id)
                if not owners:
                    del self._owners[key]
                    self._discarded.pop(key, None)  # nothing records under it any more
                    if key in self._entries:
                        self._finished[key] = now
        while self._finished and next(iter(self._finished.values())) < now - FINISHED_SECONDS:
            self._drop(next(iter(self._finished)))
        while self._discarded and next(iter(self._discarded.values())) < now - FINISHED_SECONDS:
            self._discarded.popitem(last=False)

    def discard(self, key: Wanted) -> None:
        """The API will not take `key`: drop its entry, and whatever its requests record later."""
        done = key in self._finished  # its requests finished: nothing more will record under it
        self._drop(key)
        if not done:
            self._discarded[key] = self._clock()

    def entry(self, key: Wanted, make: Callable[[], Any]) -> _Entry:
        """The entry under `key`, made (empty, no bytes) if there is none; for a discarded key, a
        full entry that is not kept (nothing is recorded)."""
        if key in self._discarded:
            return _Entry(None, full=True)
        found = self._entries.get(key)
        if found is None:
            found = self._entries[key] = _Entry(make())
            if key not in self._owners:  # recorded for a request already finished (or never owned)
                self._finished[key] = self._clock()
        return found

    def charge(self, key: Wanted, nbytes: int, force: bool = False) -> bool:
        """Charge `nbytes` more to the entry under `key` (made by `entry`); False, with the entry
        marked full and emptied, if the budget cannot hold them even after dropping every
        finished entry. `force`: charge whatever the budget (a few bytes that must be kept)."""
        entry = self._entries.get(key)
        if entry is None or entry.full:  # discarded, or already full
            return False
        while self.held_bytes + nbytes > self.max_bytes and not force and self._finished:
            oldest = next(iter(self._finished))
            if oldest == key:
                break
            self._drop(oldest)
        if self.held_bytes + nbytes > self.max_bytes and not force:
            self.held_bytes -= entry.nbytes
            entry.value, entry.nbytes, entry.full = None, 0, True
            self.full_total += 1
            return False
        entry.nbytes += nbytes
        self.held_bytes += nbytes
        return True

    def take(self, key: Wanted) -> _Entry | None:
        """The entry under `key`, removed; None if there is none."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        self._finished.pop(key, None)
        self.held_bytes -= entry.nbytes
        return entry

    def full_marker(self) -> dict:
        """What a take answers for an entry that outgrew the budget (the API makes it a 503)."""
        return {FULL_MARKER: f"the workers' result store (--max-worker-store-mib {self.max_bytes / 2**20:g}) is full "
                             "with the results of running requests"}

    def _drop(self, key: Wanted) -> None:
        self._finished.pop(key, None)
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.held_bytes -= entry.nbytes

    def stats(self) -> dict:
        return {"store_entries": self.num_entries, "store_bytes": self.held_bytes,
                "store_max_bytes": self.max_bytes, "store_full_total": self.full_total}
