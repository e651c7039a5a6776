"""Admission of distinct steering configs: at most `max_configs` in flight, extras wait.

The workers hold a fixed number of config slots. Rather than failing a request when all are
taken, the API process lets it wait here until a slot frees; requests with an id already in
flight join it at no cost (equal specs share one slot).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from contextlib import asynccontextmanager


class ConfigAdmission:
    def __init__(self, max_configs: int):
        self.max_configs = max_configs
        self._in_flight: Counter[str] = Counter()
        self._changed = asyncio.Condition()
        self.waits_total = 0

    @property
    def active(self) -> int:
        return len(self._in_flight)

    @asynccontextmanager
    async def admit(self, steering_id: str):
        async with self._changed:
            if steering_id not in self._in_flight and self.active >= self.max_configs:
                self.waits_total += 1
                await self._changed.wait_for(
                    lambda: steering_id in self._in_flight or self.active < self.max_configs
                )
            self._in_flight[steering_id] += 1
        try:
            yield
        finally:
            async with self._changed:
                self._in_flight[steering_id] -= 1
                if self._in_flight[steering_id] <= 0:
                    del self._in_flight[steering_id]
                self._changed.notify_all()
