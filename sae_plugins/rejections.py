"""Requests whose steering or capture spec a worker refused, so the API can fail them.

A worker that cannot verify the API's signature (a node started without the deployment's
STEERSERVE_SPEC_SECRET) or finds a spec that does not fit its tables runs the request unsteered
rather than crash the step (steering_runtime.py). The API must not then return that answer as a
steered one, so every request the API signs a spec for also carries an unsigned ticket; a worker
that refuses the spec records the reason under the ticket, and the API takes it with the
response (server/steering_middleware.py) and answers 5xx instead.
"""

from __future__ import annotations

from collections import OrderedDict

TICKET_KEY = "steerserve_ticket"
MAX_PENDING_REJECTIONS = 4096  # rejections nobody took (client gone): dropped oldest first


def ticket_of(extra_args: dict) -> str | None:
    """The request's ticket: any short string (unsigned, since it only ever names a rejection)."""
    ticket = extra_args.get(TICKET_KEY)
    return ticket if isinstance(ticket, str) and 0 < len(ticket) <= 64 else None


class Rejections:
    def __init__(self) -> None:
        self._reasons: OrderedDict[str, str] = OrderedDict()

    def record(self, ticket: str | None, reason: str) -> None:
        if ticket is None:
            return
        self._reasons[ticket] = reason
        while len(self._reasons) > MAX_PENDING_REJECTIONS:
            self._reasons.popitem(last=False)

    def take(self, ticket: str) -> str | None:
        return self._reasons.pop(ticket, None)
