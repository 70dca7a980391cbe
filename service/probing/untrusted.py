"""Bounded readers for untrusted containers: zip archives, `.npy` headers and JSON.

Everything a client uploads is read through these, in the service process and again in the probe
subprocess, so that a small file cannot make either of them allocate much more than the limits allow:

- `open_zip` checks the end-of-central-directory record (entry count, central directory size) before
  `zipfile.ZipFile` parses the central directory, so a zip declaring 1.5 M entries costs one small read.
- `read_member` / `read_member_into` decompress a member in bounded chunks with a running cap: a member
  whose header lies about its size (zipfile would otherwise decompress up to 2 GiB in one call) stops
  at the cap, and the bytes come out only after the zip's CRC check passed.
- `read_npy_header` reads an `.npy` member's header (dtype, shape, order) without touching its data,
  so an array can be refused by its declared size before anything is decompressed.
- `loads_json` measures the nesting depth of a JSON text before parsing it.

torch-free and numpy-free (numpy only inside `read_npy_header`): the service process uses it freely.
"""

from __future__ import annotations

import ast
import json
import lzma
import math
import os
import re
import struct
import zipfile
import zlib
from pathlib import Path
from typing import IO, Any

CHUNK_BYTES = 256 * 1024
# zipfile stores one ZipInfo (~0.5 kB of Python objects) per central directory record of >= 46 bytes.
DEFAULT_MAX_DIRECTORY_BYTES = 4 * 1024**2
MAX_NPY_HEADER_BYTES = 64 * 1024
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKETS = re.compile(rb"[\[\]{}]")


# What reading a hostile zip can raise besides InputRefused: bad headers, CRC mismatches, corrupt
# deflate/bzip2/lzma streams, encrypted (RuntimeError) or unknown (NotImplementedError) members.
ZIP_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile,
    zlib.error,
    lzma.LZMAError,
    OSError,
    EOFError,
    ValueError,
    RuntimeError,
    NotImplementedError,
    struct.error,
)


class InputRefused(ValueError):
    """Untrusted input refused, with a stable code and a message meant for the client."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --------------------------------------------------------------------------------------------------
# Zip archives


def zip_directory(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(entries, central directory bytes) from the end record, as `zipfile` will read them.

    Raises InputRefused("not_a_zip") when the file has no end record.
    """
    with open(path, "rb") as handle:
        # zipfile's own end-record reader: it reads at most the last 64 kB + 98 bytes, and returns
        # exactly the numbers ZipFile will then trust (including a ZIP64 record's).
        end = zipfile._EndRecData(handle)  # type: ignore[attr-defined]
    if end is None:
        raise InputRefused("not_a_zip", "the file is not a zip archive")
    return int(end[zipfile._ECD_ENTRIES_TOTAL]), int(end[zipfile._ECD_SIZE])  # type: ignore[attr-defined]


def open_zip(
    path: str | os.PathLike[str],
    *,
    max_entries: int,
    max_directory_bytes: int = DEFAULT_MAX_DIRECTORY_BYTES,
    what: str = "zip archive",
) -> zipfile.ZipFile:
    """A ZipFile for `path`, opened only after its end record passed the entry and size limits."""
    entries, directory = zip_directory(path)
    if entries > max_entries:
        raise InputRefused(
            "too_many_entries", f"the {what} declares {entries} entries, over the limit of {max_entries}"
        )
    if directory > max_directory_bytes or directory > Path(path).stat().st_size:
        raise InputRefused(
            "too_many_entries",
            f"the {what}'s central directory is {directory} bytes, over the limit of {max_directory_bytes}",
        )
    try:
        archive = zipfile.ZipFile(path)
    except ZIP_ERRORS as exc:
        raise InputRefused("not_a_zip", f"the {what} cannot be read: {exc}") from None
    if len(archive.infolist()) > max_entries:  # the record's count and the directory disagree
        archive.close()
        raise InputRefused("too_many_entries", f"the {what} holds more than {max_entries} entries")
    return archive


def read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, *, limit: int, what: str) -> bytes:
    """The member's bytes, decompressed in chunks and refused as soon as they pass `limit`."""
    if info.file_size > limit:
        raise InputRefused(
            "member_too_large", f"{what} unpacks to {info.file_size} bytes, over the limit of {limit}"
        )
    out = bytearray()
    try:
        with archive.open(info) as member:
            while chunk := member.read(CHUNK_BYTES):
                out += chunk
                if len(out) > limit:
                    raise InputRefused("member_too_large", f"{what} unpacks to more than {limit} bytes")
    except InputRefused:
        raise
    except ZIP_ERRORS as exc:
        raise InputRefused("not_a_zip", f"{what} cannot be read from the zip archive: {exc}") from None
    return bytes(out)


def read_member_into(member: IO[bytes], target: memoryview, *, what: str) -> None:
    """Fill `target` exactly from an open member (chunked); refuse a member shorter or longer."""
    view = target.cast("B")
    filled = 0
    try:
        while filled < len(view):
            chunk = member.read(min(CHUNK_BYTES, len(view) - filled))
            if not chunk:
                raise InputRefused("invalid_sample", f"{what}: the data is shorter than its header declares")
            view[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
        if member.read(1):
            raise InputRefused("invalid_sample", f"{what}: the data is longer than its header declares")
    except InputRefused:
        raise
    except ZIP_ERRORS as exc:
        raise InputRefused("invalid_sample", f"{what} cannot be read from the zip archive: {exc}") from None


# --------------------------------------------------------------------------------------------------
# .npy headers


def read_npy_header(member: IO[bytes], *, what: str) -> tuple[Any, tuple[int, ...], bool]:
    """(numpy dtype, shape, fortran_order) of an `.npy` stream, leaving it at the first data byte.

    The header is a Python dict literal: parsed with `ast.literal_eval` (never `eval`) after its
    length is bounded. Object dtypes (pickles) are refused here.
    """
    try:
        return _read_npy_header(member, what)
    except InputRefused:
        raise
    except ZIP_ERRORS as exc:
        raise InputRefused("invalid_sample", f"{what} cannot be read from the zip archive: {exc}") from None


def _read_npy_header(member: IO[bytes], what: str) -> tuple[Any, tuple[int, ...], bool]:
    import numpy as np  # lazy: only sample readers need it

    magic = member.read(8)
    if len(magic) < 8 or magic[:6] != b"\x93NUMPY":
        raise InputRefused("invalid_sample", f"{what} is not an .npy array")
    major = magic[6]
    if major == 1:
        raw_len = member.read(2)
        length = struct.unpack("<H", raw_len)[0] if len(raw_len) == 2 else -1
    elif major in (2, 3):
        raw_len = member.read(4)
        length = struct.unpack("<I", raw_len)[0] if len(raw_len) == 4 else -1
    else:
        raise InputRefused("invalid_sample", f"{what}: unsupported .npy format version {major}")
    if not 0 < length <= MAX_NPY_HEADER_BYTES:
        raise InputRefused("invalid_sample", f"{what}: bad .npy header length")
    header = member.read(length)
    if len(header) != length:
        raise InputRefused("invalid_sample", f"{what}: truncated .npy header")
    try:
        text = header.decode("utf-8" if major == 3 else "latin1")
        fields = ast.literal_eval(text.strip())
        descr, shape, fortran = fields["descr"], fields["shape"], fields["fortran_order"]
        dtype = np.lib.format.descr_to_dtype(descr)
    except Exception:  # literal_eval and descr_to_dtype raise many kinds on hostile text
        raise InputRefused("invalid_sample", f"{what}: malformed .npy header") from None
    if not isinstance(shape, tuple) or any(type(d) is not int or d < 0 for d in shape):
        raise InputRefused("invalid_sample", f"{what}: malformed .npy shape {shape!r}")
    if not isinstance(fortran, bool):
        raise InputRefused("invalid_sample", f"{what}: malformed .npy header")
    if dtype.hasobject:
        raise InputRefused("pickled_content", f"{what} holds pickled (object) arrays, which are refused")
    return dtype, shape, fortran


def declared_bytes(shape: tuple[int, ...], itemsize: int) -> int:
    return math.prod(shape) * itemsize


# --------------------------------------------------------------------------------------------------
# JSON


def json_depth(raw: bytes) -> int:
    """The deepest nesting of arrays/objects in a JSON text (strings are skipped)."""
    depth = deepest = 0
    for bracket in _JSON_BRACKETS.findall(_JSON_STRING.sub(b"", raw)):
        if bracket in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def loads_json(raw: bytes | str, *, max_depth: int, what: str, code: str = "invalid_json") -> Any:
    """Parse JSON whose nesting is at most `max_depth` (deeper: InputRefused, never RecursionError)."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if json_depth(data) > max_depth:
        raise InputRefused(code, f"{what} nests JSON deeper than {max_depth} levels")
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise InputRefused(code, f"{what} is not valid JSON: {exc}") from None
