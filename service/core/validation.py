"""What can name a key, and what JSON keyledger stores: the checks the HTTP layer (``http/inputs.py``) and the
better-auth import (``ops/importer.py``) share. No error format here: each caller reports a failure its own way
(a 400 in better-auth's wording, a rejected row).
"""

from __future__ import annotations

import re
from typing import Any

# Ids keyledger creates are 32 letters/digits; imported ones may add '-' or '_'. Anything else (dots,
# wildcards, spaces...) cannot name a key, and must never reach a NATS subject.
KEY_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
MAX_DEPTH = 32  # JSON nesting keyledger accepts, in a request body or an imported metadata/permissions value


class TooDeep(ValueError):
    """A JSON value nests deeper than ``MAX_DEPTH`` levels."""


def plausible_key_id(key_id: str) -> bool:
    return KEY_ID_RE.fullmatch(key_id) is not None


def has_nul(value: Any) -> bool:
    """Whether any string (key or value) anywhere in a decoded JSON value holds U+0000. Iterative, and raises
    ``TooDeep`` past ``MAX_DEPTH`` levels, so no value can make it recurse or run long."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, (dict, list)):
            if depth > MAX_DEPTH:
                raise TooDeep(f"nests deeper than {MAX_DEPTH} levels")
            if isinstance(item, dict):
                for k, v in item.items():
                    if "\x00" in k:
                        return True
                    stack.append((v, depth + 1))
            else:
                stack.extend((v, depth + 1) for v in item)
    return False
