"""The pickle-free loader (probe subprocess only): an inspected archive rebuilt as an ExportedProgram.

`load_program` re-inspects the archive (`archive.read_checked_program`), then rebuilds the program from
the raw weight bytes and the graph JSON bytes it just checked: the sample inputs are never read, and
`torch.load`, `pickle.load(s)` and torch's object unpickler are replaced by a function that refuses
while it runs. torch has no public API for this, so every private one it needs is used in one
function, `_deserialize`, which refuses with `unsupported_torch` when a torch version moved or changed
any of them.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from service.probing.exported.archive import MODEL_NAME, ArchiveError, read_checked_program


@contextlib.contextmanager
def _refuse_unpickling() -> Iterator[None]:
    """While active, every unpickling entry point torch's archive loader could reach raises."""

    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise ArchiveError("pickled_content", "the archive asked to unpickle data, which is refused")

    targets = [
        (torch, "load"),
        (torch.serialization, "load"),
        (pickle, "load"),
        (pickle, "loads"),
        (torch._C, "_pickle_load_obj"),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name in targets if hasattr(owner, name)]
    for owner, name, _ in saved:
        setattr(owner, name, refuse)
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


@functools.lru_cache(maxsize=2)
def load_program(path: str) -> torch.export.ExportedProgram:
    """The archive's ExportedProgram, rebuilt from its graph JSON and raw weight bytes (no pickle).

    Cached per path: callers must not train the program's own weights (`build` deep-copies them).
    """
    if not Path(path).is_file():
        raise ArchiveError(
            "artifact_missing",
            f"model archive {Path(path).name!r} is missing on this host (was the artifact deleted?)",
        )
    program_json = read_checked_program(path)  # the bytes checked are the bytes read
    return _deserialize(str(path), program_json)


def _deserialize(path: str, program_json: bytes) -> torch.export.ExportedProgram:
    """Every private torch API the loader uses, resolved and checked against the arguments it will
    pass before any is called: an ImportError, a missing attribute or a changed signature (a torch
    version that moved its loader's internals) is ArchiveError `unsupported_torch`."""

    def unsupported(detail: object) -> ArchiveError:
        return ArchiveError(
            "unsupported_torch", f"torch {torch.__version__} cannot load export archives here: {detail}"
        )

    try:
        from torch._export.serde import schema
        from torch._export.serde.serialize import ExportedProgramDeserializer, _bytes_to_dataclass
        from torch.export.pt2_archive._package import PT2ArchiveReader, _load_constants, _load_state_dict

        program_type = schema.ExportedProgram
        deserializer = ExportedProgramDeserializer()
        calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = [
            (PT2ArchiveReader, (path,)),
            (_bytes_to_dataclass, (program_type, program_json)),
            (_load_state_dict, (None, MODEL_NAME)),
            (_load_constants, (None, MODEL_NAME)),
            (deserializer.deserialize, (None, {}, {}, b"")),
        ]
    except (ImportError, AttributeError, TypeError) as exc:
        raise unsupported(exc) from exc
    for function, arguments in calls:
        try:
            inspect.signature(function).bind(*arguments)
        except (TypeError, ValueError) as exc:
            name = getattr(function, "__qualname__", repr(function))
            raise unsupported(f"{name} no longer takes the loader's arguments ({exc})") from exc
    with _refuse_unpickling():
        reader = PT2ArchiveReader(path)
        serialized = _bytes_to_dataclass(program_type, program_json)
        state_dict = _load_state_dict(reader, MODEL_NAME)
        constants = _load_constants(reader, MODEL_NAME)
        # b"": no sample inputs. torch would torch.load them, falling back to weights_only=False.
        return deserializer.deserialize(serialized, state_dict, constants, b"")
