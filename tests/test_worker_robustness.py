"""Request data can never raise inside a worker step (issue 10): the real SteeringRuntime fed
what a hostile client, a bug or another pipeline stage could put in `extra_args`."""

from __future__ import annotations

import json

import pytest
import torch

from steerserve_sae.protocol import signing
from steerserve_sae.protocol.capture import CaptureSpec
from steerserve_sae.protocol.rpc import CAPTURE_KEY
from steerserve_sae.protocol.plugin_config import PluginConfig
from steerserve_sae.steering.runtime import SteeringRuntime
from tests.request_views import RequestView
from steerserve_sae.protocol.rpc import EXTRA_ARGS_KEY
from tests.test_steering_units import spec, tiny_sae

CANONICAL = spec((0, 5, "add", 2.0)).canonical_json()
BAD_EXTRA_ARGS = {
    "unsigned spec": {EXTRA_ARGS_KEY: CANONICAL},
    "forged signature": {EXTRA_ARGS_KEY: "0" * 64 + "." + CANONICAL},
    "empty object, signed": {EXTRA_ARGS_KEY: signing.sign("{}")},
    "not JSON, signed": {EXTRA_ARGS_KEY: signing.sign("add 2 to feature 5")},
    "not a string": {EXTRA_ARGS_KEY: 12},
    "layer without an SAE": {EXTRA_ARGS_KEY: spec((7, 5, "add", 2.0)).to_extra_arg()},
    "index past d_sae": {EXTRA_ARGS_KEY: spec((0, 16, "clamp", 2.0)).to_extra_arg()},
    "unknown mode": {EXTRA_ARGS_KEY: signing.sign(CANONICAL.replace('"add"', '"boost"'))},
    "capture {} (issue 10's crash)": {CAPTURE_KEY: "{}"},
    "capture top_k past d_sae": {CAPTURE_KEY: CaptureSpec("c", (0,), top_k=17).to_extra_arg()},
    "capture at a layer without an SAE": {CAPTURE_KEY: CaptureSpec("c", (3,), top_k=2).to_extra_arg()},
}


def runtime(sae_layers=(0,), local=(0,), max_configs=2) -> SteeringRuntime:
    saes = {layer: tiny_sae() for layer in local}
    for layer, sae in saes.items():
        sae.layer = layer
    return SteeringRuntime(PluginConfig("mem", sae_layers, max_features=4, max_configs=max_configs), saes,
                           torch.device("cpu"))


def step(rt: SteeringRuntime, views: list[RequestView]) -> tuple[torch.Tensor, torch.Tensor]:
    rt.begin_step(RequestView.batch(views))
    hidden = torch.randn(sum(v.num_scheduled for v in views), 8, generator=torch.Generator().manual_seed(0))
    before = hidden.clone()
    for layer in sorted(rt.saes):
        rt.apply(layer, hidden, torch.zeros_like(hidden))
    rt.verify_applied()
    return before, hidden


@pytest.mark.parametrize("name", BAD_EXTRA_ARGS)
def test_a_bad_spec_runs_its_request_unsteered_and_its_neighbours_steered(name):
    rt = runtime()
    good = spec((0, 5, "add", 2.0))
    views = [RequestView("bad", BAD_EXTRA_ARGS[name], 2, 0, 2),
             RequestView("good", {EXTRA_ARGS_KEY: good.to_extra_arg()}, 2, 0, 2)]
    before, after = step(rt, views)
    assert rt.rejected_requests_total == 1
    assert torch.equal(after[:2], before[:2])
    assert torch.allclose(after[2:], before[2:] + 2.0 * rt.saes[0].W_dec[5], atol=1e-5)
    step(rt, views)  # read once: the next step neither re-reads nor re-counts it
    assert rt.rejected_requests_total == 1


def test_a_spec_signed_with_another_deployments_secret_is_refused(monkeypatch):
    signed_elsewhere = spec((0, 5, "add", 2.0)).to_extra_arg()
    monkeypatch.setenv(signing.SECRET_ENV, "another-deployment")
    rt = runtime()
    before, after = step(rt, [RequestView("r", {EXTRA_ARGS_KEY: signed_elsewhere}, 1, 0, 1)])
    assert rt.rejected_requests_total == 1 and torch.equal(after, before)


def test_signature_round_trip_and_tamper():
    signed = signing.sign('{"a": 1}')
    assert signing.verify(signed) == '{"a": 1}'
    mac, payload = signed.split(".", 1)
    with pytest.raises(signing.SignatureError):
        signing.verify(mac + "." + payload.replace("1", "2"))


def test_pipeline_stage_steers_its_own_layers_of_a_spec_that_spans_stages():
    """Stage 2 of a PP=2 split holds layer 1 only; a spec editing layers 0 and 1 (and a capture
    of layer 0) must neither raise there nor be refused: stage 1 applies the layer-0 part."""
    rt = runtime(sae_layers=(0, 1), local=(1,))
    both = spec((0, 5, "add", 2.0), (1, 6, "add", 3.0))
    capture = CaptureSpec("c", (0, 1), top_k=2)
    views = [RequestView("r", {EXTRA_ARGS_KEY: both.to_extra_arg(), CAPTURE_KEY: capture.to_extra_arg()}, 2, 0, 2),
             RequestView("only-stage-1", {EXTRA_ARGS_KEY: spec((0, 5, "add", 2.0)).to_extra_arg()}, 1, 0, 1)]
    before, after = step(rt, views)
    assert rt.rejected_requests_total == 0
    assert torch.allclose(after[:2], before[:2] + 3.0 * rt.saes[1].W_dec[6], atol=1e-5)
    assert torch.equal(after[2:], before[2:])
    assert set(rt.captures.take("c")) == {1}


def test_full_slot_tables_run_the_request_unsteered_instead_of_failing_the_step():
    rt = runtime(max_configs=1)  # (1 API server + 1) * 1 + 1 = 3 slots, 2 usable
    views = [RequestView(f"r{i}", {EXTRA_ARGS_KEY: spec((0, i, "add", 1.0)).to_extra_arg()}, 1, 0, 1)
             for i in range(3)]
    before, after = step(rt, views)
    assert rt.slots.active == 2 and rt.rejected_requests_total == 1
    assert not torch.equal(after[:2], before[:2]) and torch.equal(after[2], before[2])


@pytest.mark.parametrize("api_servers,max_configs,slots", [(1, 64, 129), (4, 64, 321), (2, 1, 4)])
def test_slots_cover_every_api_process(api_servers, max_configs, slots):
    config = PluginConfig("mem", (0,), max_configs=max_configs, api_servers=api_servers)
    assert config.num_slots == slots
    assert PluginConfig.from_additional_config({"steerserve": json.loads(json.dumps(config.to_dict()))}) == config


def test_large_steps_encode_in_bounded_chunks_with_unchanged_results():
    """The PyTorch edit and captures work through ENCODE_CHUNK_ROWS rows at a time (a bounded
    workspace at 27B shapes); the result equals the edit computed on all rows at once."""
    from steerserve_sae.sae import sae_math
    from steerserve_sae.steering.runtime import ENCODE_CHUNK_ROWS

    sae = tiny_sae()
    rt = SteeringRuntime(PluginConfig("mem", (0,), max_features=4, max_configs=2, steering_kernel="torch"),
                         {0: sae}, torch.device("cpu"), max_rows=1024)
    n = 2 * ENCODE_CHUNK_ROWS + 37
    clamp = spec((0, 3, "clamp", 5.0), (0, 9, "scale", 2.0))
    capture = CaptureSpec("big", (0,), top_k=3)
    view = RequestView("r", {EXTRA_ARGS_KEY: clamp.to_extra_arg(), CAPTURE_KEY: capture.to_extra_arg()}, n, 0, n)
    before, after = step(rt, [view])
    ids = torch.tensor([[3, 9]] * n)
    offset, gain = torch.tensor([[5.0, 0.0]] * n), torch.tensor([[-1.0, 1.0]] * n)
    expected = before + sae_math.encoded_delta(sae, before, ids, offset, gain)
    assert torch.allclose(after, expected, atol=1e-5)
    result = rt.captures.take("big")[0]
    assert result["positions"] == list(range(n))
    top = sae_math.encode(sae, after).topk(3, dim=-1)
    assert result["indices"] == top.indices.tolist()


def test_workspace_is_reserved_at_its_largest():
    rt = runtime()
    rt.reserve_workspace()  # runs the math once on a full chunk: must not raise
    assert rt.workspace_bytes() == 256 * (3 * 16 * 4 + 4 * 8 * 4)
