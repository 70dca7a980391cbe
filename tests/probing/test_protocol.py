"""The JSON-lines protocol a probe or dry-run child speaks to its parent."""

from __future__ import annotations

import io
import json

from service.probing.protocol import emitter, error_message, final_message, parse_line, result_message


def test_lines_that_are_not_json_objects_are_ignored() -> None:
    assert parse_line(b'{"event": "phase"}\n') == {"event": "phase"}
    for line in (b"", b"   \n", b"not json", b"[1, 2]", b"\xff\xfe", b"3"):
        assert parse_line(line) is None


def test_the_final_message_is_the_last_result_or_error_line() -> None:
    lines = [b'{"event": "phase"}', b"garbage", b'{"event": "result", "result": {"a": 1}}', b'{"event": "x"}']
    assert final_message(lines) == result_message({"a": 1})
    assert final_message([*lines, json.dumps(error_message("c", "m")).encode()]) == {
        "event": "error",
        "code": "c",
        "message": "m",
    }
    assert final_message([b'{"event": "phase"}']) is None


def test_the_child_writes_strict_json_one_message_a_line() -> None:
    stream = io.StringIO()
    emit = emitter(stream)
    emit(result_message({"loss": float("nan"), "curve": (1.0, float("inf")), "n": 2}))
    emit({"event": "phase"})
    first, second = stream.getvalue().splitlines()
    assert json.loads(first) == {"event": "result", "result": {"loss": None, "curve": [1.0, None], "n": 2}}
    assert parse_line(second.encode()) == {"event": "phase"}
