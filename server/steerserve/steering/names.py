"""The one rule for names a client gives stored things: presets, vectors and contrast's `save_as`.

A name is a URL path segment (`/v1/steering/presets/{name}`, `/v1/steering/vectors/{name}`) and a
`model` id, so it must survive curl, browsers and proxies: no slashes or spaces, and not only dots
("." and ".." are rewritten away by every URL normaliser).
"""

from __future__ import annotations

import re

from steerserve.errors import APIError

NAME_PATTERN = re.compile(r"(?!\.+$)[A-Za-z0-9._:-]{1,64}")
NAME_RULE = "1 to 64 characters of A-Z a-z 0-9 . _ : -, not only dots"


def is_name(name: object) -> bool:
    return isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None


def check_name(name: object, kind: str, param: str = "name") -> str:
    """`name` when it follows the rule; else a 400 with code invalid_{kind}_name."""
    if not is_name(name):
        raise APIError(f"a {kind} name is {NAME_RULE}", param=param, code=f"invalid_{kind}_name")
    return name
