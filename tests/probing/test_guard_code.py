"""Shape guards from an uploaded archive: the ones torch.export writes pass, anything else is refused."""

from __future__ import annotations

import json

import pytest

from service.probing.exported import ArchiveError, check_program_json
from service.probing.guard_code import check_guard_code

WRITTEN_BY_TORCH_EXPORT = [
    "(6*L['tokens'].size()[0]) == (6*L['targets'].size()[0])",
    "L['x'].size()[0] <= 1024",
    "2 <= L['x'].size()[0]",
    "Max(2, L['x'].size()[1]) >= 2 and not L['y'].dim() == 3",
    "L['x'].stride()[0] == L['x'].size()[1]",
]
HOSTILE = [
    "__import__('os').system('touch /tmp/guard-marker')",
    "L['x'].size.__class__",
    "(lambda: 1)()",
    "L['x'].size()[0] == 'a'",
    "open('/etc/passwd')",
    "L[__import__('os')]",
    "L['x'].size()[0].__class__",
    "[c for c in ().__class__.__base__.__subclasses__()]",
    "L['x'].size()[0] ==",
]


@pytest.mark.parametrize("guard", WRITTEN_BY_TORCH_EXPORT)
def test_guards_torch_export_writes_pass(guard: str) -> None:
    check_guard_code(guard)


@pytest.mark.parametrize("guard", HOSTILE)
def test_anything_else_is_refused(guard: str) -> None:
    with pytest.raises(ValueError, match="guard"):
        check_guard_code(guard)


def test_a_hostile_guard_in_the_program_json_is_an_unsafe_archive() -> None:
    program = {"guards_code": [WRITTEN_BY_TORCH_EXPORT[0], HOSTILE[0]]}
    with pytest.raises(ArchiveError) as refused:
        check_program_json(json.dumps(program).encode(), "models/model.json")
    assert refused.value.code == "unsafe_archive_content"
    assert "guards_code" in refused.value.message
    check_program_json(json.dumps({"guards_code": WRITTEN_BY_TORCH_EXPORT}).encode(), "models/model.json")
