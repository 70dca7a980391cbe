"""The JSON-lines protocol between a child process (the probe runner, the exported model's dry run) and
its parent (`service.probing.sandbox`, the artifact check).

The child reads one JSON request on stdin and writes one JSON object per line to the protocol stream:
any number of events (`{"event": "phase", ...}`), then exactly one final line, `{"event": "result",
"result": {...}}` or `{"event": "error", "code": ..., "message": ...}`. The parent parses lines as JSON
only (never pickle) and ignores any line that is not a JSON object.

The protocol stream is the child's *original* stdout, duplicated to a private descriptor before fd 1
is pointed at stderr: anything model code prints (Python or C++) lands in stderr and cannot corrupt
the protocol.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Iterable
from typing import IO, Any

RESULT = "result"
ERROR = "error"
READY = "ready"  # written by a standby probe once its imports are done, before it reads its request

Emit = Callable[[dict[str, Any]], None]


# --- child side -------------------------------------------------------------------------------------


def open_stream() -> IO[str]:
    """Move the real stdout to a private descriptor for the protocol; fd 1 becomes stderr."""
    sys.stdout.flush()
    protocol_fd = os.dup(1)  # not inherited by grandchildren (os.dup makes it non-inheritable)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    return os.fdopen(protocol_fd, "w", buffering=1, encoding="utf-8")


def json_safe(value: Any) -> Any:
    """NaN and infinities become null: strict JSON has no spelling for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def emitter(stream: IO[str]) -> Emit:
    """A function that writes one message as one strict-JSON line and flushes it."""

    def emit(message: dict[str, Any]) -> None:
        stream.write(json.dumps(json_safe(message), allow_nan=False, default=str) + "\n")
        stream.flush()

    return emit


def result_message(result: dict[str, Any]) -> dict[str, Any]:
    return {"event": RESULT, "result": result}


def error_message(code: str, message: str) -> dict[str, Any]:
    return {"event": ERROR, "code": code, "message": message}


# --- parent side ------------------------------------------------------------------------------------


def parse_line(line: bytes) -> dict[str, Any] | None:
    """One protocol line as a dict; anything else (blank, not JSON, not an object) is None."""
    line = line.strip()
    if not line:
        return None
    try:
        message = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return message if isinstance(message, dict) else None


def is_final(message: dict[str, Any]) -> bool:
    """Whether the message is the child's result or error line."""
    return message.get("event") in (RESULT, ERROR)


def final_message(lines: Iterable[bytes]) -> dict[str, Any] | None:
    """The last result or error line among `lines` (a child's whole output), if any."""
    final = None
    for line in lines:
        message = parse_line(line)
        if message is not None and is_final(message):
            final = message
    return final
