"""The Triton steering backend for GPUs: capture-safe by construction. EXPERIMENTAL.

The same edit as the native CPU kernel (kernels/steer_rows_cpu.cpp), from the same fixed
buffers, but with nothing read back to the host: every grid is fixed by shapes alone (the
forward's row count N, d_sae), and each program reads the live counts from `plan_counts` on
the device and exits early past them. That is what a replayed CUDA graph needs: the host only
rewrites the buffers in place before each step.

Seven launches per steered layer:
  0. vector projections: per row with projected vector edits (steering/vector_math.py), each
     entry's coefficient min(offset + gain * (x . dir), upper) from the stream as it arrived;
  1. touched pre-activations: per encoded row, x = hidden + residual (- b_dec) against the
     encoder rows of its touched features only (edited features in lanes [0, F_BLOCK), gate
     probes in lanes [F_BLOCK, 2 F_BLOCK));
  2. TopK rank counts: the encode GEMM over all d_sae features, row tiles looped up to the live
     count on the device, whose epilogue counts per touched feature how many pre-activations
     are ahead of it (larger, or tied with a lower index: activations.py's rule). The
     [rows, d_sae] pre-activation is never stored;
  3. gates: each probed gate's activation (kept iff fewer than k are ahead; ReLU / JumpReLU
     otherwise) against its bounds, into the row's gate_state column (gating.py);
  4. the edit: the same activation rule, coefficient gate * (offset + gain * f),
     x += sum coef * W_dec[f], written back with one rounding;
  5. the vector edits: x += sum gate * coef * dir (the gates written by 3), one rounding;
  6. `add` vectors, added to their rows.

Status: checked against the PyTorch op in Triton's interpreter on CPU
(tests/test_triton_kernel.py); never compiled or timed on a GPU, so `--steering-kernel triton`
is opt-in and the GPU default stays the PyTorch op.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from steerserve_sae.backends.base import KernelBackend, LayerBuffers


def _interpreted() -> bool:
    return bool(triton.knobs.runtime.interpret)


def runs_on(device: torch.device) -> bool:
    """CUDA, or any device under Triton's interpreter (TRITON_INTERPRET=1, how the tests run)."""
    return device.type == "cuda" or _interpreted()


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    """float32 x rounded to `dtype` (round-to-nearest-even), kept in float32. For bf16 the bits
    are rounded explicitly, so the result is the same on a GPU and in Triton's interpreter
    (whose float32 -> bf16 cast truncates)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(dtype).to(tl.float32)


@triton.jit
def _encoded_row(routing, counts, feature_ids, max_rows, e, F, F_BLOCK: tl.constexpr):
    """(row, config slot, feature lanes, live-lane mask, feature ids) of encoded row e."""
    row = tl.load(routing + 2 * max_rows + e)
    slot = tl.load(routing + 3 * max_rows + e)
    fs = tl.arange(0, F_BLOCK)
    fmask = fs < tl.load(counts + 2)
    return row, slot, fs, fmask, tl.load(feature_ids + slot * F + fs, mask=fmask, other=0)


@triton.jit
def _gate_probes(counts, gate_ids, slot, F, F_BLOCK: tl.constexpr):
    """(gate lanes, live-lane mask, probed feature ids, probed-here mask) of a row's slot."""
    cs = tl.arange(0, F_BLOCK)
    cmask = cs < tl.load(counts + 3)
    probe = tl.load(gate_ids + slot * F + cs, mask=cmask, other=-1)
    return cs, cmask, tl.maximum(probe, 0), cmask & (probe >= 0)


@triton.jit
def _kept(a, ahead, ids, threshold, k, mask, TOPK: tl.constexpr, HAS_THRESHOLD: tl.constexpr):
    """A touched feature's activation from its pre-activation `a` and TopK rank `ahead`."""
    if TOPK:
        a = tl.where(ahead < k, a, 0.0)
    if HAS_THRESHOLD:
        a = tl.where(a > tl.load(threshold + ids, mask=mask, other=0.0), a, 0.0)
    return tl.maximum(a, 0.0)


@triton.jit
def _touched_pre_activations(hidden, residual, routing, counts, feature_ids, gate_ids, W_enc, b_enc, b_dec, act,
                             above, max_rows, d, stride_h, stride_r, F,
                             HAS_B_DEC: tl.constexpr, F_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    e = tl.program_id(0)
    num_encoded = tl.load(counts + 1)
    if e < num_encoded:
        row, slot, fs, fmask, ids = _encoded_row(routing, counts, feature_ids, max_rows, e, F, F_BLOCK)
        cs, cmask, probes, _ = _gate_probes(counts, gate_ids, slot, F, F_BLOCK)
        acc = tl.zeros([F_BLOCK], dtype=tl.float32)
        gacc = tl.zeros([F_BLOCK], dtype=tl.float32)
        for j0 in range(0, d, BLOCK_D):
            js = j0 + tl.arange(0, BLOCK_D)
            jmask = js < d
            x = tl.load(hidden + row * stride_h + js, mask=jmask, other=0.0).to(tl.float32)
            x += tl.load(residual + row * stride_r + js, mask=jmask, other=0.0).to(tl.float32)
            if HAS_B_DEC:
                x -= tl.load(b_dec + js, mask=jmask, other=0.0)
            x = _rounded(x, W_enc.dtype.element_ty)
            w = tl.load(W_enc + ids[:, None] * d + js[None, :], mask=fmask[:, None] & jmask[None, :], other=0.0)
            acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
            g = tl.load(W_enc + probes[:, None] * d + js[None, :], mask=cmask[:, None] & jmask[None, :], other=0.0)
            gacc += tl.sum(g.to(tl.float32) * x[None, :], axis=1)
        # the encoder's output dtype, as its GEMM rounds
        a = _rounded(acc + tl.load(b_enc + ids, mask=fmask, other=0.0).to(tl.float32), W_enc.dtype.element_ty)
        ga = _rounded(gacc + tl.load(b_enc + probes, mask=cmask, other=0.0).to(tl.float32), W_enc.dtype.element_ty)
        lanes = act + e * 2 * F_BLOCK
        tl.store(lanes + fs, a, mask=fmask)
        tl.store(lanes + F_BLOCK + cs, ga, mask=cmask)
        zeros = tl.zeros([F_BLOCK], dtype=tl.int32)
        tl.store(above + e * 2 * F_BLOCK + fs, zeros, mask=fmask)
        tl.store(above + e * 2 * F_BLOCK + F_BLOCK + cs, zeros, mask=cmask)


@triton.jit
def _topk_rank_counts(hidden, residual, routing, counts, feature_ids, gate_ids, W_enc, b_enc, b_dec, act, above,
                      max_rows, d, d_sae, stride_h, stride_r, F,
                      HAS_B_DEC: tl.constexpr, F_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = ns < d_sae
    num_encoded = tl.load(counts + 1)
    width = tl.load(counts + 2)
    gate_width = tl.load(counts + 3)
    bias = tl.load(b_enc + ns, mask=nmask, other=0.0).to(tl.float32)
    for m0 in range(0, num_encoded, BLOCK_M):
        ms = m0 + tl.arange(0, BLOCK_M)
        mmask = ms < num_encoded
        rows = tl.load(routing + 2 * max_rows + ms, mask=mmask, other=0)
        slots = tl.load(routing + 3 * max_rows + ms, mask=mmask, other=0)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, d, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < d
            xmask = mmask[:, None] & kmask[None, :]
            x = tl.load(hidden + rows[:, None] * stride_h + ks[None, :], mask=xmask, other=0.0).to(tl.float32)
            x += tl.load(residual + rows[:, None] * stride_r + ks[None, :], mask=xmask, other=0.0).to(tl.float32)
            if HAS_B_DEC:
                x -= tl.load(b_dec + ks, mask=kmask, other=0.0)[None, :]
            w = tl.load(W_enc + ns[:, None] * d + ks[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
            x = _rounded(x, W_enc.dtype.element_ty)
            if DOT_IN_FP32:  # the interpreter's bf16 dot is wrong; bf16 products are exact in fp32
                acc = tl.dot(x, tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(x.to(W_enc.dtype.element_ty), tl.trans(w), acc, input_precision="ieee")
        pre = _rounded(acc + bias[None, :], W_enc.dtype.element_ty)
        for f in range(0, width):
            fid = tl.load(feature_ids + slots * F + f, mask=mmask, other=0)
            _count_ahead(pre, ns, nmask, ms, mmask, fid, act, above, f, F_BLOCK)
        for c in range(0, gate_width):
            fid = tl.maximum(tl.load(gate_ids + slots * F + c, mask=mmask, other=0), 0)
            _count_ahead(pre, ns, nmask, ms, mmask, fid, act, above, F_BLOCK + c, F_BLOCK)


@triton.jit
def _count_ahead(pre, ns, nmask, ms, mmask, fid, act, above, lane, F_BLOCK: tl.constexpr):
    """Adds to lane `lane` of each row's rank count the pre-activations of this tile ahead of
    the lane's feature: larger, or tied with a lower index (activations.py's rule)."""
    a = tl.load(act + ms * 2 * F_BLOCK + lane, mask=mmask, other=0.0)
    ahead = (pre > a[:, None]) | ((pre == a[:, None]) & (ns[None, :] < fid[:, None]))
    hit = ahead & nmask[None, :] & (ns[None, :] != fid[:, None])
    tl.atomic_add(above + ms * 2 * F_BLOCK + lane, tl.sum(hit.to(tl.int32), axis=1), mask=mmask)


@triton.jit
def _write_gates(routing, counts, gate_ids, gate_bounds, gate_state, threshold, act, above, max_rows, F, k,
                 TOPK: tl.constexpr, HAS_THRESHOLD: tl.constexpr, F_BLOCK: tl.constexpr):
    e = tl.program_id(0)
    if e < tl.load(counts + 1):
        row = tl.load(routing + 2 * max_rows + e)
        slot = tl.load(routing + 3 * max_rows + e)
        cs, cmask, probes, here = _gate_probes(counts, gate_ids, slot, F, F_BLOCK)
        lanes = e * 2 * F_BLOCK + F_BLOCK + cs
        a = _kept(tl.load(act + lanes, mask=cmask, other=0.0), tl.load(above + lanes, mask=cmask, other=0),
                  probes, threshold, k, cmask, TOPK, HAS_THRESHOLD)
        lower = tl.load(gate_bounds + (slot * F + cs) * 2, mask=cmask, other=0.0)
        upper = tl.load(gate_bounds + (slot * F + cs) * 2 + 1, mask=cmask, other=0.0)
        passed = ((a > lower) & (a < upper)).to(tl.float32)
        tl.store(gate_state + row * (F + 1) + cs, passed, mask=here)


@triton.jit
def _apply_encoded_edits(hidden, routing, counts, feature_ids, coefficients, edit_gates, gate_state, W_dec,
                         threshold, act, above, max_rows, d, stride_h, F, k,
                         TOPK: tl.constexpr, HAS_THRESHOLD: tl.constexpr, F_BLOCK: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    e = tl.program_id(0)
    num_encoded = tl.load(counts + 1)
    if (e < num_encoded) & (tl.load(counts + 2) > 0):
        row, slot, fs, fmask, ids = _encoded_row(routing, counts, feature_ids, max_rows, e, F, F_BLOCK)
        offset = tl.load(coefficients + (slot * F + fs) * 2, mask=fmask, other=0.0)
        gain = tl.load(coefficients + (slot * F + fs) * 2 + 1, mask=fmask, other=0.0)
        a = _kept(tl.load(act + e * 2 * F_BLOCK + fs, mask=fmask, other=0.0),
                  tl.load(above + e * 2 * F_BLOCK + fs, mask=fmask, other=0), ids, threshold, k, fmask,
                  TOPK, HAS_THRESHOLD)
        column = tl.load(edit_gates + slot * F + fs, mask=fmask, other=F)
        gate = tl.load(gate_state + row * (F + 1) + column, mask=fmask, other=0.0)
        coef = gate * (offset + gain * a)  # padding entries are (0, 0)
        for j0 in range(0, d, BLOCK_D):
            js = j0 + tl.arange(0, BLOCK_D)
            jmask = js < d
            w = tl.load(W_dec + ids[:, None] * d + js[None, :], mask=fmask[:, None] & jmask[None, :], other=0.0)
            delta = tl.sum(coef[:, None] * w.to(tl.float32), axis=0)
            h = tl.load(hidden + row * stride_h + js, mask=jmask, other=0.0).to(tl.float32)
            out = _rounded(h + delta, hidden.dtype.element_ty)
            tl.store(hidden + row * stride_h + js, out.to(hidden.dtype.element_ty), mask=jmask)


@triton.jit
def _vector_projections(hidden, residual, routing, counts, vector_pool, vector_ids, vector_rules, vcoef, max_rows, d,
                        stride_h, stride_r, V, V_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    e = tl.program_id(0)
    if e < tl.load(counts + 4):
        row = tl.load(routing + 4 * max_rows + e)
        slot = tl.load(routing + 5 * max_rows + e)
        vs = tl.arange(0, V_BLOCK)
        vmask = vs < tl.load(counts + 5)
        ids = tl.load(vector_ids + slot * V + vs, mask=vmask, other=0)
        acc = tl.zeros([V_BLOCK], dtype=tl.float32)
        for j0 in range(0, d, BLOCK_D):
            js = j0 + tl.arange(0, BLOCK_D)
            jmask = js < d
            x = tl.load(hidden + row * stride_h + js, mask=jmask, other=0.0).to(tl.float32)
            x += tl.load(residual + row * stride_r + js, mask=jmask, other=0.0).to(tl.float32)
            w = tl.load(vector_pool + ids[:, None] * d + js[None, :], mask=vmask[:, None] & jmask[None, :], other=0.0)
            acc += tl.sum(w * x[None, :], axis=1)
        offset = tl.load(vector_rules + (slot * V + vs) * 3, mask=vmask, other=0.0)
        gain = tl.load(vector_rules + (slot * V + vs) * 3 + 1, mask=vmask, other=0.0)
        upper = tl.load(vector_rules + (slot * V + vs) * 3 + 2, mask=vmask, other=0.0)
        tl.store(vcoef + e * V_BLOCK + vs, tl.minimum(offset + gain * acc, upper), mask=vmask)


@triton.jit
def _apply_vector_edits(hidden, routing, counts, vector_pool, vector_ids, vector_gates, gate_state, vcoef, max_rows,
                        d, stride_h, V, F, V_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    e = tl.program_id(0)
    if e < tl.load(counts + 4):
        row = tl.load(routing + 4 * max_rows + e)
        slot = tl.load(routing + 5 * max_rows + e)
        vs = tl.arange(0, V_BLOCK)
        vmask = vs < tl.load(counts + 5)
        ids = tl.load(vector_ids + slot * V + vs, mask=vmask, other=0)
        column = tl.load(vector_gates + slot * V + vs, mask=vmask, other=F)
        gate = tl.load(gate_state + row * (F + 1) + column, mask=vmask, other=0.0)
        coef = gate * tl.load(vcoef + e * V_BLOCK + vs, mask=vmask, other=0.0)
        for j0 in range(0, d, BLOCK_D):
            js = j0 + tl.arange(0, BLOCK_D)
            jmask = js < d
            w = tl.load(vector_pool + ids[:, None] * d + js[None, :], mask=vmask[:, None] & jmask[None, :], other=0.0)
            delta = tl.sum(coef[:, None] * w, axis=0)
            h = tl.load(hidden + row * stride_h + js, mask=jmask, other=0.0).to(tl.float32)
            out = _rounded(h + delta, hidden.dtype.element_ty)
            tl.store(hidden + row * stride_h + js, out.to(hidden.dtype.element_ty), mask=jmask)


@triton.jit
def _add_vectors(hidden, routing, counts, add_table, max_rows, d, stride_h, BLOCK_D: tl.constexpr):
    i = tl.program_id(0)
    if i < tl.load(counts):
        row = tl.load(routing + i)
        slot = tl.load(routing + max_rows + i)
        for j0 in range(0, d, BLOCK_D):
            js = j0 + tl.arange(0, BLOCK_D)
            jmask = js < d
            v = _rounded(tl.load(add_table + slot * d + js, mask=jmask, other=0.0), hidden.dtype.element_ty)
            h = tl.load(hidden + row * stride_h + js, mask=jmask, other=0.0).to(tl.float32)
            out = _rounded(h + v, hidden.dtype.element_ty)
            tl.store(hidden + row * stride_h + js, out.to(hidden.dtype.element_ty), mask=jmask)


class TritonSteering(KernelBackend):
    """Owns the per-row scratch (touched activations and rank counts, vector coefficients),
    allocated once and shared by the layers, which run in turn."""

    name = "triton"

    def __init__(self, max_rows: int, max_features: int, device: torch.device):
        super().__init__()
        self.f_block = max(16, triton.next_power_of_2(max_features))
        # per encoded row: lanes [0, f_block) edited features, [f_block, 2 f_block) gate probes
        self.act = torch.zeros((max_rows, 2 * self.f_block), dtype=torch.float32, device=device)
        self.above = torch.zeros((max_rows, 2 * self.f_block), dtype=torch.int32, device=device)
        self.vcoef: torch.Tensor | None = None  # [max_rows, v_block]: sized by the vector table (prepare)

    def prepare(self, layer: LayerBuffers) -> None:
        super().prepare(layer)
        if self.vcoef is None:
            v_block = max(16, triton.next_power_of_2(layer.vector_ids.shape[1]))
            self.vcoef = torch.zeros((self.act.shape[0], v_block), dtype=torch.float32, device=self.act.device)

    def launch(self, hidden, residual, routing, counts, add_table, feature_ids, coefficients, edit_gates, gate_ids,
               gate_bounds, gate_state, vector_pool, vector_ids, vector_rules, vector_gates, W_enc, encoder_panels,
               b_enc, b_dec_in, W_dec, threshold, k) -> None:
        n, d = hidden.shape
        d_sae, max_rows, width = W_enc.shape[0], routing.shape[1], feature_ids.shape[1]
        assert W_enc.is_contiguous() and W_dec.is_contiguous() and hidden.stride(1) == residual.stride(1) == 1
        assert gate_state.shape == (max_rows, width + 1) and gate_ids.shape == edit_gates.shape == feature_ids.shape
        b_dec = b_dec_in if b_dec_in is not None else b_enc  # unread without HAS_B_DEC
        encode = dict(HAS_B_DEC=b_dec_in is not None, F_BLOCK=self.f_block)
        rule = dict(TOPK=k > 0, HAS_THRESHOLD=threshold is not None, F_BLOCK=self.f_block)
        threshold = threshold if threshold is not None else b_enc  # unread without HAS_THRESHOLD
        vectors = dict(V_BLOCK=self.vcoef.shape[1], BLOCK_D=128)
        num_vectors = vector_ids.shape[1]
        assert vector_pool.is_contiguous() and vector_pool.shape[1] == d and vector_gates.shape == vector_ids.shape
        _vector_projections[(n,)](hidden, residual, routing, counts, vector_pool, vector_ids, vector_rules, self.vcoef,
                                  max_rows, d, hidden.stride(0), residual.stride(0), num_vectors, **vectors)
        _touched_pre_activations[(n,)](
            hidden, residual, routing, counts, feature_ids, gate_ids, W_enc, b_enc, b_dec, self.act, self.above,
            max_rows, d, hidden.stride(0), residual.stride(0), width, BLOCK_D=128, **encode)
        if k > 0:
            _topk_rank_counts[(triton.cdiv(d_sae, 64),)](
                hidden, residual, routing, counts, feature_ids, gate_ids, W_enc, b_enc, b_dec, self.act, self.above,
                max_rows, d, d_sae, hidden.stride(0), residual.stride(0), width,
                BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, DOT_IN_FP32=W_enc.dtype == torch.float32 or _interpreted(),
                **encode)
        _write_gates[(n,)](routing, counts, gate_ids, gate_bounds, gate_state, threshold, self.act, self.above,
                           max_rows, width, k, **rule)
        _apply_encoded_edits[(n,)](
            hidden, routing, counts, feature_ids, coefficients, edit_gates, gate_state, W_dec, threshold,
            self.act, self.above, max_rows, d, hidden.stride(0), width, k, BLOCK_D=128, **rule)
        _apply_vector_edits[(n,)](hidden, routing, counts, vector_pool, vector_ids, vector_gates, gate_state, self.vcoef,
                                  max_rows, d, hidden.stride(0), num_vectors, width, **vectors)
        _add_vectors[(n,)](hidden, routing, counts, add_table, max_rows, d, hidden.stride(0), BLOCK_D=128)
