"""Exact behaviour of the pieces the server and plugin are built from (no vLLM engine)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from steerserve_sae.sae import sae_math
from steerserve_sae.steering.config_slots import ConfigSlots, ConfigSlotsExhausted
from steerserve_sae.sae.autoencoder import SAEWeights
from steerserve_sae.protocol.spec import FeatureEdit, SteeringSpec
from steerserve_sae.steering.token_routing import APPLY_ALL, APPLY_GENERATION, APPLY_PROMPT, token_slots
from steerserve_sae.protocol.rpc import CAPTURES, GATE_REPORTS
from steerserve.steering.admission import ConfigAdmission
from steerserve.steering.worker_takes import WorkerTakes


def test_token_slots_follow_positions_and_apply_to():
    # req0: prefill chunk of 3 (prompt 5, nothing computed); req1: decode at position 7 (prompt 4);
    # req2: prompt-only, chunk crossing the prompt end; req3: unsteered.
    slots = token_slots(
        req_slots=np.array([1, 2, 3, 0]),
        req_apply_to=np.array([APPLY_ALL, APPLY_GENERATION, APPLY_PROMPT, APPLY_ALL]),
        num_scheduled=np.array([3, 1, 4, 2]),
        num_computed=np.array([0, 7, 2, 0]),
        num_prompt=np.array([5, 4, 4, 9]),
    )
    assert slots.tolist() == [1, 1, 1, 2, 3, 3, 0, 0, 0, 0]


def test_generation_only_starts_at_prompt_length():
    slots = token_slots(np.array([4]), np.array([APPLY_GENERATION]), np.array([6]), np.array([0]), np.array([5]))
    assert slots.tolist() == [0, 0, 0, 0, 0, 4]


def spec(*features, apply_to="all"):
    return SteeringSpec.create([FeatureEdit(*f) for f in features], apply_to)


def test_spec_id_is_order_independent_and_round_trips():
    a = spec((1, 3, "add", 8.0), (2, 9, "clamp", 1.0))
    b = spec((2, 9, "clamp", 1.0), (1, 3, "add", 8.0))
    assert a.id == b.id
    assert SteeringSpec.from_extra_arg(a.to_extra_arg()) == a
    assert spec((1, 3, "add", 8.0)).id != spec((1, 3, "add", 8.0), apply_to="generation").id


def test_config_slots_share_equal_specs_and_free_on_last_release():
    slots = ConfigSlots(3)  # two usable
    s1, s2, s3 = spec((1, 1, "add", 1.0)), spec((1, 2, "add", 1.0)), spec((1, 3, "add", 1.0))
    assert slots.acquire("a", s1) == (1, True)
    assert slots.acquire("b", s1) == (1, False)
    assert slots.acquire("c", s2) == (2, True)
    with pytest.raises(ConfigSlotsExhausted):
        slots.acquire("d", s3)
    assert slots.release("a") is None
    assert slots.release("b") == 1
    assert slots.acquire("d", s3) == (1, True)


def tiny_sae(activation="topk", k=2):
    g = torch.Generator().manual_seed(0)
    d, n = 8, 16
    return SAEWeights(
        layer=0, W_enc=torch.randn(n, d, generator=g), b_enc=torch.zeros(n), W_dec=torch.randn(n, d, generator=g),
        b_dec=torch.zeros(d), activation=activation, k=k, threshold=None, apply_b_dec_to_input=False,
        architecture="test", source="memory",
    )


def test_encode_topk_keeps_k_largest_relu():
    sae = tiny_sae()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    f = sae_math.encode(sae, x)
    pre = torch.relu(x @ sae.W_enc.T)
    for row in range(3):
        top = pre[row].topk(2).indices
        assert set(f[row].nonzero().squeeze(-1).tolist()) <= set(top.tolist())
        assert torch.allclose(f[row, top], pre[row, top])


def test_encoded_delta_and_add_vector_formulas():
    sae = tiny_sae()
    x = torch.randn(1, 8, generator=torch.Generator().manual_seed(2))
    f = sae_math.encode(sae, x)[0]
    active = int(f.argmax())
    ids = torch.tensor([[active, 7, 0]])
    coefficients = [sae_math.edit_coefficients("clamp", 10.0), sae_math.edit_coefficients("scale", 3.0), (0.0, 0.0)]
    offset, gain = torch.tensor([coefficients]).unbind(-1)
    delta = sae_math.encoded_delta(sae, x, ids, offset, gain)[0]
    expected = (10.0 - f[active]) * sae.W_dec[active] + (3.0 - 1) * f[7] * sae.W_dec[7]
    assert sae_math.edit_coefficients("ablate", 5.0) == (0.0, -1.0)
    assert torch.allclose(delta, expected, atol=1e-5)
    assert torch.allclose(sae_math.add_vector(sae, [5, 6], [2.0, -1.0]), 2.0 * sae.W_dec[5] - sae.W_dec[6])


def test_admission_waits_for_a_free_config_and_shares_equal_ids():
    async def scenario():
        admission = ConfigAdmission(max_configs=1)
        order = []
        async def hold(sid, label, seconds):
            async with admission.admit(sid):
                order.append(f"{label}+")
                await asyncio.sleep(seconds)
                order.append(f"{label}-")
        await asyncio.gather(hold("x", "a", 0.05), hold("x", "b", 0.01), hold("y", "c", 0.0))
        return order, admission.waits_total
    order, waits = asyncio.run(scenario())
    assert order.index("c+") > order.index("a-") and order.index("c+") > order.index("b-")
    assert order.index("b+") < order.index("a-")  # equal id joined without waiting
    assert waits == 1


def test_runtime_routes_each_row_to_its_own_config():
    from steerserve_sae.protocol.plugin_config import PluginConfig
    from steerserve_sae.steering.runtime import SteeringRuntime
    from tests.request_views import RequestView
    from steerserve_sae.protocol.rpc import EXTRA_ARGS_KEY

    sae = tiny_sae()
    runtime = SteeringRuntime(PluginConfig("mem", (0,), max_features=4, max_configs=2), {0: sae}, torch.device("cpu"))
    add_spec = spec((0, 5, "add", 2.0))
    clamp_spec = spec((0, 7, "clamp", 3.0), apply_to="generation")
    views = [
        RequestView("plain", {}, num_scheduled=2, num_computed=0, num_prompt=2),
        RequestView("add", {EXTRA_ARGS_KEY: add_spec.to_extra_arg()}, num_scheduled=2, num_computed=0, num_prompt=2),
        RequestView("clamp", {EXTRA_ARGS_KEY: clamp_spec.to_extra_arg()}, num_scheduled=2, num_computed=3, num_prompt=4),
    ]
    runtime.begin_step(RequestView.batch(views))
    assert runtime.step_slots.tolist() == [0, 0, 1, 1, 0, 2]
    g = torch.Generator().manual_seed(3)
    hidden, residual = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    before = hidden.clone()
    runtime.apply(0, hidden, residual)
    assert torch.equal(hidden[[0, 1, 4]], before[[0, 1, 4]])
    assert torch.allclose(hidden[2:4], before[2:4] + 2.0 * sae.W_dec[5], atol=1e-5)
    f7 = sae_math.encode(sae, (before[5] + residual[5])[None])[0, 7]
    assert torch.allclose(hidden[5], before[5] + (3.0 - f7) * sae.W_dec[7], atol=1e-5)
    # The next step: "add" finished, its slot is freed and cleared.
    runtime.finish_requests(["add"])
    runtime.begin_step(RequestView.batch([views[2]]))
    assert runtime.step_slots.tolist() == [0, 2]  # positions 3 (prompt), 4 (generation)
    assert runtime.slots.active == 1 and not runtime.tables.has_add[0, 1]


def test_a_forward_that_skipped_the_op_fails_loudly():
    """If a captured graph replayed the op (its Python never ran), the step must fail rather
    than sample unsteered tokens."""
    from steerserve_sae.protocol.plugin_config import PluginConfig
    from steerserve_sae.steering.runtime import SteeringRuntime
    from tests.request_views import RequestView
    from steerserve_sae.protocol.rpc import EXTRA_ARGS_KEY

    runtime = SteeringRuntime(PluginConfig("mem", (0,), max_features=4, max_configs=2), {0: tiny_sae()},
                              torch.device("cpu"))
    steered = RequestView("r", {EXTRA_ARGS_KEY: spec((0, 5, "add", 2.0)).to_extra_arg()}, 2, 0, 2)
    runtime.begin_step(RequestView.batch([steered]))
    runtime.apply(0, torch.zeros(2, 8), torch.zeros(2, 8))
    runtime.verify_applied()  # the op ran: fine
    runtime.begin_step(RequestView.batch([steered]))
    with pytest.raises(RuntimeError, match=r"did not run at layers \[0\]"):
        runtime.verify_applied()
    runtime.begin_step(RequestView.batch([RequestView("plain", {}, 2, 0, 2)]))
    runtime.verify_applied()  # nothing planned, nothing to check


@pytest.mark.parametrize("activation", ["topk", "relu", "jumprelu"])
def test_feature_activations_equal_the_dense_encode(activation):
    sae = tiny_sae(activation)
    if activation == "jumprelu":
        sae.threshold = torch.full((sae.d_sae,), 0.3)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(4))
    ids = torch.randint(0, sae.d_sae, (5, 6), generator=torch.Generator().manual_seed(5))
    ids[:, 0] = sae_math.encode(sae, x).argmax(-1)  # at least one active feature per row
    dense = sae_math.encode(sae, x).gather(-1, ids)
    assert torch.equal(sae_math.feature_activations(sae, x, ids), dense)


def test_float32_encoder_encodes_the_stored_weights_exactly():
    sae = tiny_sae()
    sae.W_enc, sae.b_enc = sae.W_enc.bfloat16(), sae.b_enc.bfloat16()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(6))
    stored = sae.nbytes()
    sae.use_float32_encoder()
    pre = sae_math.pre_activation(sae, x)
    exact = x.double() @ sae.W_enc.double().T + sae.b_enc.double()
    assert pre.dtype == torch.float32 and torch.allclose(pre.double(), exact, atol=1e-5)
    assert sae.nbytes() == stored + (16 * 8 + 16) * 4  # the copy is counted


def test_reused_routing_is_replanned_when_a_slot_changes_hands():
    """A decode step that routes like the last one reuses its plan; a slot freed and re-used by
    a different spec (same slot number, same routing bytes) must not."""
    from steerserve_sae.protocol.plugin_config import PluginConfig
    from steerserve_sae.steering.runtime import SteeringRuntime
    from tests.request_views import RequestView
    from steerserve_sae.protocol.rpc import EXTRA_ARGS_KEY

    sae = tiny_sae()
    runtime = SteeringRuntime(PluginConfig("mem", (0,), max_features=4, max_configs=1), {0: sae}, torch.device("cpu"))
    add_view = RequestView("a", {EXTRA_ARGS_KEY: spec((0, 5, "add", 2.0)).to_extra_arg()}, 1, 4, 2)
    for _ in range(2):  # the second step reuses the first one's plan
        runtime.begin_step(RequestView.batch([add_view]))
        hidden = torch.zeros(1, 8)
        runtime.apply(0, hidden, torch.zeros(1, 8))
        assert torch.allclose(hidden[0], 2.0 * sae.W_dec[5], atol=1e-5)
    residual = torch.randn(1, 8, generator=torch.Generator().manual_seed(7))
    active = int(sae_math.encode(sae, residual)[0].argmax())
    scale_view = RequestView("b", {EXTRA_ARGS_KEY: spec((0, active, "scale", 3.0)).to_extra_arg()}, 1, 4, 2)
    runtime.finish_requests(["a"])
    runtime.begin_step(RequestView.batch([scale_view]))
    assert runtime.step_slots.tolist() == [1]  # the same slot, the same routing bytes
    hidden = torch.zeros(1, 8)
    runtime.apply(0, hidden, residual)
    f = sae_math.encode(sae, residual)[0, active]
    assert f > 0 and torch.allclose(hidden[0], 2.0 * f * sae.W_dec[active], atol=1e-5)


def test_cpu_encoder_choice_keeps_large_encoders_in_their_dtype():
    small = tiny_sae()
    small.W_enc, small.b_enc = small.W_enc.bfloat16(), small.b_enc.bfloat16()
    small.choose_cpu_encoder()
    assert small.encoder()[0].dtype == torch.float32
    large = tiny_sae()
    large.W_enc = torch.zeros(4096, 512, dtype=torch.bfloat16)  # 8 MiB in float32
    large.choose_cpu_encoder()
    assert large.encoder_compute is None and large.encoder()[0].dtype == torch.bfloat16


def test_engine_core_waits_for_workers_by_sleeping(monkeypatch):
    """sae_plugins/steerserve_sae/vllm_hooks/upstream_fixes.py: within its busy window the engine core's wait for worker
    output sleeps instead of spinning on sched_yield (which starved the API server sharing its
    CPU); outside the window it still blocks on the queue's notify socket."""
    import time

    import zmq
    from vllm.distributed.device_communicators import shm_broadcast

    from steerserve_sae.vllm_hooks import upstream_fixes

    context = zmq.Context()
    writer = shm_broadcast.SpinCondition(False, context, "inproc://steerserve-test-notify")  # binds first
    reader = shm_broadcast.SpinCondition(True, context, "inproc://steerserve-test-notify")
    upstream_fixes.sleep_while_busy(reader)
    monkeypatch.setattr(shm_broadcast, "sched_yield", lambda: pytest.fail("the wait spun on sched_yield"))
    sleeps = []
    monkeypatch.setattr(upstream_fixes.time, "sleep", sleeps.append)
    reader.record_read()
    reader.wait(timeout_ms=1000)
    assert sleeps == [upstream_fixes.ENGINE_WAIT_SLEEP_S]
    reader.last_read = time.monotonic() - reader.busy_loop_s - 1  # idle: the socket, 20 ms timeout
    started = time.monotonic()
    reader.wait(timeout_ms=20)
    assert sleeps == [upstream_fixes.ENGINE_WAIT_SLEEP_S] and time.monotonic() - started >= 0.015
    # every socket closed here, in order, before the context ends: context.destroy() while a
    # dropped socket's finaliser might close it too aborted the process once (libzmq assertion)
    for socket in (reader.local_notify_socket, reader.read_cancel_socket, reader.write_cancel_socket,
                   writer.local_notify_socket):
        socket.close(linger=0)
    context.term()


class _SlowEngine:
    """collective_rpc as the engine client has it: each call waits for `release`; rank 0
    holds every result, rank 1 none (two pipeline stages, the traced layers on the first)."""

    def __init__(self, fail: bool = False):
        self.calls: list[list] = []
        self.release = asyncio.Event()
        self.fail = fail

    async def collective_rpc(self, method, args=()):
        assert method == "steerserve_take"
        self.calls.append([tuple(w) for w in args[0]])
        await self.release.wait()
        if self.fail:
            raise RuntimeError("engine dead")
        return [[f"{store}/{key}" for store, key in args[0]], None]


async def _until(condition):
    for _ in range(100):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("never happened")


def test_worker_takes_go_alone_when_idle_and_together_while_an_rpc_is_in_flight():
    async def main():
        engine = _SlowEngine()
        takes = WorkerTakes(engine)
        first = asyncio.create_task(takes.take(CAPTURES, "a"))
        await _until(lambda: engine.calls)
        assert engine.calls == [[(CAPTURES, "a")]]  # alone: at once
        later = [asyncio.create_task(takes.take(store, key))
                 for store, key in [(GATE_REPORTS, "r"), (CAPTURES, "b"), (CAPTURES, "b")]]
        many = asyncio.create_task(takes.take_many([(CAPTURES, "t/0"), (CAPTURES, "t/1")]))
        gone = asyncio.create_task(takes.take(CAPTURES, "gone"))
        await _until(lambda: all(t._fut_waiter is not None for t in [*later, many, gone]))
        gone.cancel()
        engine.release.set()
        assert await first == ["captures/a", None]
        assert [await t for t in later] == [["gate_reports/r", None], ["captures/b", None], ["captures/b", None]]
        assert await many == [["captures/t/0", None], ["captures/t/1", None]]
        # everything asked for during the first RPC went in the second, except that a key asked
        # for twice is taken twice (the second time in a third RPC); a cancelled caller's key is
        # still taken (the worker frees it)
        assert engine.calls[1:] == [[(GATE_REPORTS, "r"), (CAPTURES, "b"), (CAPTURES, "t/0"), (CAPTURES, "t/1"),
                                     (CAPTURES, "gone")], [(CAPTURES, "b")]]
        assert (takes.rpcs_total, takes.taken_total) == (3, 7)
        with pytest.raises(ValueError):
            await takes.take("kv_cache", "a")

    asyncio.run(main())


def test_worker_takes_pass_the_engines_error_to_every_waiting_caller_and_go_on():
    async def main():
        engine = _SlowEngine(fail=True)
        takes = WorkerTakes(engine)
        waiting = [asyncio.create_task(takes.take(CAPTURES, key)) for key in "abc"]
        await _until(lambda: len(engine.calls) == 1)
        engine.release.set()
        for task in waiting:
            with pytest.raises(RuntimeError, match="engine dead"):
                await task
        engine.fail = False
        assert await takes.take(GATE_REPORTS, "d") == ["gate_reports/d", None]

    asyncio.run(main())


def test_worker_takes_whose_drain_is_cancelled_leave_no_caller_waiting():
    async def main():
        engine = _SlowEngine()
        takes = WorkerTakes(engine)
        in_flight = asyncio.create_task(takes.take(CAPTURES, "a"))
        await _until(lambda: engine.calls)
        queued = asyncio.create_task(takes.take(CAPTURES, "b"))
        await _until(lambda: queued._fut_waiter is not None)
        takes._drain.cancel()  # e.g. the server shutting down mid-RPC
        for task in (in_flight, queued):
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 5)
        engine.release.set()
        assert await asyncio.wait_for(takes.take(GATE_REPORTS, "c"), 5) == ["gate_reports/c", None]

    asyncio.run(main())
