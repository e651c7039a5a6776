"""What each config slot does at each steered layer: device tables written once per config.

Like LoRA's stacked adapter weights: one row per (layer, slot), allocated at start-up and
written in place, so the steering op always reads the same addresses. Slot 0 stays zero (no
steering). Which request holds which slot is config_slots.py's business; this module only
holds the tables' contents, plus host mirrors of their shape so the step planner never reads
the device.

Gated edits (protocol/spec.py's Gate) go through the encoded table whatever their mode (a gated `add`
is the entry (value, 0): coefficient value whatever the feature's activation), each entry
naming the gate column that multiplies it; column `max_features` is all ones (ungated). A
layer's gate probes list, per gate column, the feature whose activation there decides it (-1:
that gate reads another layer).

Direction vectors (vector_math.py): an ungated `add` is folded into the config's add vector
like a feature's; every other vector edit is an entry naming a row of the vector pool (each
slot owns `max_vectors` rows, one per vector of its spec), its coefficient rule and its gate
column.
"""

from __future__ import annotations

import numpy as np
import torch

from steerserve_sae.sae import sae_math
from steerserve_sae.steering import vector_math
from steerserve_sae.sae.autoencoder import SAEWeights
from steerserve_sae.protocol.spec import SteeringSpec


class SlotTables:
    def __init__(self, saes: dict[int, SAEWeights], num_slots: int, max_features: int, device: torch.device,
                 max_vectors: int = 8, vector_layers: tuple[int, ...] = (), d_model: int = 0):
        """`vector_layers`: this worker's layers without an SAE that direction vectors steer
        (their feature and gate tables stay empty); `d_model`: the stream's width, needed when
        there is no SAE to read it from."""
        self.saes = saes
        self.max_vectors = max_vectors
        self.layer_pos = {layer: i for i, layer in enumerate(sorted({*saes, *vector_layers}))}  # this worker's layers
        num_layers = len(self.layer_pos)
        d_model = next(iter(saes.values())).d_model if saes else d_model
        # add: one precomputed vector per (layer, slot).
        self.add_vectors = torch.zeros((num_layers, num_slots, d_model), dtype=torch.float32, device=device)
        # clamp/scale/ablate: feature ids and the coefficient rule offset + gain * f_i on each
        # feature's decoder row (sae_math.edit_coefficients); (0, 0) marks padding.
        shape = (num_layers, num_slots, max_features)
        self.feature_ids = torch.zeros(shape, dtype=torch.int64, device=device)
        self.coefficients = torch.zeros((*shape, 2), dtype=torch.float32, device=device)
        self.ungated = max_features  # the gate column that always passes
        self.edit_gates = torch.full(shape, self.ungated, dtype=torch.int64, device=device)
        self.gate_ids = torch.full(shape, -1, dtype=torch.int64, device=device)
        self.gate_bounds = torch.zeros((*shape, 2), dtype=torch.float32, device=device)  # (above, below)
        # vectors: the pool of directions, and per (layer, slot) entries (pool row, rule, gate column)
        self.vector_pool = torch.zeros((num_slots * max_vectors, d_model), dtype=torch.float32, device=device)
        vshape = (num_layers, num_slots, max_vectors)
        self.vector_ids = torch.zeros(vshape, dtype=torch.int64, device=device)
        self.vector_rules = torch.zeros((*vshape, 3), dtype=torch.float32, device=device)  # (offset, gain, upper)
        self.vector_gates = torch.full(vshape, self.ungated, dtype=torch.int64, device=device)
        # Host mirrors, read by the step planner.
        self.has_add = np.zeros((num_layers, num_slots), dtype=bool)
        self.needs_encode = np.zeros((num_layers, num_slots), dtype=bool)
        self.encode_counts = np.zeros((num_layers, num_slots), dtype=np.int64)
        self.gate_counts = np.zeros((num_layers, num_slots), dtype=np.int64)  # gate columns probed here
        self.vector_counts = np.zeros((num_layers, num_slots), dtype=np.int64)  # projected vector entries
        self.version = 0  # bumped on every change: a cached step plan is only valid for one version

    def write(self, slot: int, spec: SteeringSpec) -> None:
        """Only this worker's layers: with pipeline parallelism the other stages write theirs."""
        self.version += 1
        for layer, li in self.layer_pos.items():
            edits = [f for f in spec.features if f.layer == layer]
            adds = [f for f in edits if f.mode == "add" and f.when is None]
            encoded = [f for f in edits if f.mode != "add" or f.when is not None]
            vectors = [(j, v) for j, v in enumerate(spec.vectors) if v.layer == layer]
            vector_adds = [v for _, v in vectors if v.mode == "add" and v.when is None]
            projected = [(j, v) for j, v in vectors if v.mode != "add" or v.when is not None]
            if adds or vector_adds:
                add = sae_math.add_vector(self.saes[layer], [f.index for f in adds], [f.value for f in adds]) \
                    if adds else torch.zeros_like(self.add_vectors[li, slot])
                for v in vector_adds:
                    add = add + vector_math.added(v).to(add.device)
                self.add_vectors[li, slot] = add
            self.vector_gates[li, slot] = self.ungated
            for e, (j, v) in enumerate(projected):
                row = slot * self.max_vectors + j
                self.vector_pool[row] = vector_math.direction(v)
                self.vector_ids[li, slot, e] = row
                self.vector_rules[li, slot, e] = torch.tensor(vector_math.coefficients(v))
                self.vector_gates[li, slot, e] = self.ungated if v.when is None else spec.gate_column(v.when)
            self.vector_counts[li, slot] = len(projected)
            n = len(encoded)
            self.edit_gates[li, slot] = self.ungated
            if n:
                coefficients = torch.tensor([sae_math.edit_coefficients(f.mode, f.value) for f in encoded])
                self.feature_ids[li, slot, :n] = torch.tensor([f.index for f in encoded])
                self.coefficients[li, slot, :n] = coefficients
                self.edit_gates[li, slot, :n] = torch.tensor(
                    [self.ungated if f.when is None else spec.gate_column(f.when) for f in encoded])
            probes = [(c, gate) for c, gate in enumerate(spec.gates) if gate.layer == layer]
            self.gate_ids[li, slot] = -1
            for c, gate in probes:
                self.gate_ids[li, slot, c] = gate.index
                self.gate_bounds[li, slot, c] = torch.tensor(gate.bounds)
            self.gate_counts[li, slot] = max((c + 1 for c, _ in probes), default=0)
            self.encode_counts[li, slot] = n
            self.needs_encode[li, slot] = n > 0 or bool(probes)
            self.has_add[li, slot] = bool(adds or vector_adds)

    def clear(self, slot: int) -> None:
        self.version += 1
        self.add_vectors[:, slot].zero_()
        self.coefficients[:, slot].zero_()
        self.needs_encode[:, slot] = False
        self.has_add[:, slot] = False
        self.encode_counts[:, slot] = 0
        self.gate_counts[:, slot] = 0
        self.vector_rules[:, slot].zero_()
        self.vector_counts[:, slot] = 0

    def nbytes(self) -> int:
        tables = (self.add_vectors, self.feature_ids, self.coefficients, self.edit_gates, self.gate_ids, self.gate_bounds,
                  self.vector_pool, self.vector_ids, self.vector_rules, self.vector_gates)
        return sum(t.numel() * t.element_size() for t in tables)
