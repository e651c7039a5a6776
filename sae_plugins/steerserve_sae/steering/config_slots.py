"""Config slots: a fixed number of rows in the steering tables, shared by equal specs.

Like LoRA adapter slots: requests reference a slot index, equal specs (same id) share one slot,
and a slot is freed when the last request using it finishes. Slot 0 is reserved for "no
steering". Each API process admits at most `max_configs` distinct specs at a time; the worker
has slots for all API processes plus headroom (PluginConfig.num_slots), so an abort racing a new
request cannot exhaust the tables (and if it ever did, the request would run unsteered, logged,
rather than fail the engine's step).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from steerserve_sae.protocol.spec import SteeringSpec


class ConfigSlotsExhausted(RuntimeError):
    pass


@dataclass
class _Slot:
    spec: SteeringSpec
    requests: set[str] = field(default_factory=set)


class ConfigSlots:
    def __init__(self, num_slots: int):
        self.num_slots = num_slots  # including reserved slot 0
        self._by_spec_id: dict[str, int] = {}
        self._slots: dict[int, _Slot] = {}
        self._free = list(range(num_slots - 1, 0, -1))
        self._slot_of_request: dict[str, int] = {}

    def slot_of(self, req_id: str) -> int | None:
        return self._slot_of_request.get(req_id)

    def acquire(self, req_id: str, spec: SteeringSpec) -> tuple[int, bool]:
        """Slot for this request's spec; the bool says the slot is new (tables need writing)."""
        slot = self._by_spec_id.get(spec.id)
        is_new = slot is None
        if slot is None:
            if not self._free:
                raise ConfigSlotsExhausted(
                    f"all {self.num_slots - 1} steering config slots are in use"
                )
            slot = self._free.pop()
            self._by_spec_id[spec.id] = slot
            self._slots[slot] = _Slot(spec)
        self._slots[slot].requests.add(req_id)
        self._slot_of_request[req_id] = slot
        return slot, is_new

    def release(self, req_id: str) -> int | None:
        """Drop a finished request; returns the slot if it became free."""
        slot = self._slot_of_request.pop(req_id, None)
        if slot is None:
            return None
        entry = self._slots[slot]
        entry.requests.discard(req_id)
        if entry.requests:
            return None
        del self._slots[slot]
        del self._by_spec_id[entry.spec.id]
        self._free.append(slot)
        return slot

    @property
    def active(self) -> int:
        return len(self._slots)
