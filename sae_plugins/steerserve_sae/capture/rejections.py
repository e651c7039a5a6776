"""Requests whose steering or capture spec a worker refused, so the API can fail them.

A worker that cannot verify the API's signature (a node started without the deployment's
STEERSERVE_SPEC_SECRET) or finds a spec that does not fit its tables runs the request unsteered
rather than crash the step (steering/runtime.py). The API must not then return that answer as a
steered one, so every request the API signs a spec for also carries an unsigned ticket; a worker
that refuses the spec records the reason under the ticket, and the API takes it with the
response (server/steerserve/middleware/steering.py) and answers 5xx instead. A reason is kept whatever the
worker store's budget (store.py): a few bytes, and dropping it would let the answer pass.
"""

from __future__ import annotations

from steerserve_sae.capture.store import WorkerStore
from steerserve_sae.protocol.plugin_config import DEFAULT_MAX_STORE_MIB
from steerserve_sae.protocol.rpc import REJECTIONS, TICKET_KEY


def ticket_of(extra_args: dict) -> str | None:
    """The request's ticket: any short string (unsigned, since it only ever names a rejection)."""
    ticket = extra_args.get(TICKET_KEY)
    return ticket if isinstance(ticket, str) and 0 < len(ticket) <= 64 else None


class Rejections:
    def __init__(self, store: WorkerStore | None = None) -> None:
        self.store = store or WorkerStore(DEFAULT_MAX_STORE_MIB * 2**20)

    def record(self, ticket: str | None, reason: str) -> None:
        if ticket is None:
            return
        key = (REJECTIONS, ticket)
        stored = self.store.entry(key, lambda: reason)
        if not stored.full and not stored.nbytes:  # full: discarded, nobody will read it
            self.store.charge(key, _STR_BYTES + len(reason), force=True)

    def take(self, ticket: str) -> str | None:
        stored = self.store.take((REJECTIONS, ticket))
        return stored.value if stored is not None else None


_STR_BYTES = 49  # a str's own size (CPython), plus a byte per ASCII character
