"""Per-deployment signatures on the specs the API process hands to the workers.

The steering and capture specs travel in `SamplingParams.extra_args`, which any route that
builds sampling params fills from a client's `vllm_xargs`. The workers must act only on specs
the API validated, so the API signs each one (HMAC-SHA256 with a secret made once per
deployment, passed to every vLLM process in the environment) and the workers drop anything
whose signature does not verify. A client cannot forge a spec on a route the API does not
know about, and a bug in one place cannot turn request data into an engine crash.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets

SECRET_ENV = "STEERSERVE_SPEC_SECRET"
# extra_args keys the plugin reads; clients may never set them (the API refuses them, and the
# workers ignore any whose value is not signed).
RESERVED_PREFIX = "steerserve_"
_SEPARATOR = "."


class SignatureError(ValueError):
    pass


def ensure_deployment_secret() -> None:
    """Called by `steerserve serve` before vLLM starts any process: they all inherit it."""
    if not os.environ.get(SECRET_ENV):
        os.environ[SECRET_ENV] = secrets.token_hex(32)


def _secret() -> bytes:
    secret = os.environ.get(SECRET_ENV)
    if not secret:
        raise SignatureError(f"{SECRET_ENV} is not set in this process (start the server with `steerserve serve`)")
    return secret.encode()


def _mac(payload: str) -> str:
    return hmac.new(_secret(), payload.encode(), hashlib.sha256).hexdigest()


def sign(payload: str) -> str:
    return _mac(payload) + _SEPARATOR + payload


def verify(signed: object) -> str:
    """The payload of a signed value; SignatureError if it was not signed with this secret."""
    if not isinstance(signed, str) or _SEPARATOR not in signed:
        raise SignatureError("not a signed steerserve value")
    mac, payload = signed.split(_SEPARATOR, 1)
    if not hmac.compare_digest(mac, _mac(payload)):
        raise SignatureError("bad signature")
    return payload
