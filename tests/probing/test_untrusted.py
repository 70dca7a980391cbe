"""service.probing.untrusted and the sample readers built on it: bounded zip, .npy and JSON reading."""

from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from service.probing import untrusted
from service.probing.data import MAX_SAMPLE_DIMS, read_npz, read_safetensors


def _zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, payload in members.items():
            archive.writestr(name, payload)
    return path


def test_the_end_record_is_read_as_zipfile_reads_it(tmp_path: Path) -> None:
    path = _zip(tmp_path / "a.zip", {f"m{i}": b"x" for i in range(7)})
    entries, directory = untrusted.zip_directory(path)
    assert entries == 7 and 7 * 46 < directory < 7 * 100
    with pytest.raises(untrusted.InputRefused) as excinfo:
        untrusted.open_zip(path, max_entries=6)
    assert excinfo.value.code == "too_many_entries"
    with pytest.raises(untrusted.InputRefused) as excinfo:
        untrusted.open_zip(path, max_entries=10, max_directory_bytes=100)
    assert excinfo.value.code == "too_many_entries"
    untrusted.open_zip(path, max_entries=7).close()
    not_zip = tmp_path / "b.zip"
    not_zip.write_bytes(b"plain text")
    with pytest.raises(untrusted.InputRefused) as excinfo:
        untrusted.zip_directory(not_zip)
    assert excinfo.value.code == "not_a_zip"


def test_members_are_read_with_a_running_cap(tmp_path: Path) -> None:
    path = _zip(tmp_path / "a.zip", {"big": b"\0" * 100_000, "small": b"ok"})
    with untrusted.open_zip(path, max_entries=2) as archive:
        assert untrusted.read_member(archive, archive.getinfo("small"), limit=10, what="small") == b"ok"
        with pytest.raises(untrusted.InputRefused) as excinfo:
            untrusted.read_member(archive, archive.getinfo("big"), limit=99_999, what="big")
        assert excinfo.value.code == "member_too_large"
        info = archive.getinfo("big")
        info.file_size = 10  # a directory that lies about the size: the CRC check refuses the member
        with pytest.raises(untrusted.InputRefused) as excinfo:
            untrusted.read_member(archive, info, limit=1000, what="big")
        assert excinfo.value.code == "not_a_zip"


def test_npy_headers_are_parsed_without_eval_and_object_arrays_refused() -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((3, 4), dtype=">f4"))
    buffer.seek(0)
    dtype, shape, fortran = untrusted.read_npy_header(buffer, what="x")
    assert (dtype.str, shape, fortran) == (">f4", (3, 4), False)
    for header in (
        "{'descr': '|O', 'fortran_order': False, 'shape': (1,)}",
        "__import__('os').system('true')",
        "{'descr': '<f8', 'fortran_order': False, 'shape': (-1,)}",
    ):
        raw = header.encode()
        with pytest.raises(untrusted.InputRefused):
            untrusted.read_npy_header(
                io.BytesIO(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(raw)) + raw), what="x"
            )


def test_json_nesting_is_measured_before_parsing() -> None:
    assert untrusted.json_depth(b'{"a": [1, {"b": "[[[["}]}') == 3
    assert untrusted.loads_json(b'{"a": [1]}', max_depth=2, what="j") == {"a": [1]}
    with pytest.raises(untrusted.InputRefused) as excinfo:
        untrusted.loads_json(b"[" * 100_000 + b"]" * 100_000, max_depth=64, what="j")
    assert "deeper than 64" in excinfo.value.message
    with pytest.raises(untrusted.InputRefused):
        untrusted.loads_json(b"{not json", max_depth=64, what="j")


def test_npz_arrays_come_back_exactly_and_bounded(tmp_path: Path) -> None:
    x = np.arange(24, dtype=">f8").reshape(2, 3, 4)
    y = np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3))
    path = tmp_path / "s.npz"
    np.savez_compressed(path, x=x, y=y)
    arrays = read_npz(path)
    assert np.array_equal(arrays["x"].numpy(), x) and np.array_equal(arrays["y"].numpy(), y)
    with pytest.raises(ValueError, match="more than the limit of 100 bytes"):
        read_npz(path, max_bytes=100)
    deep = tmp_path / "deep.npz"
    np.savez(deep, x=np.zeros((1,) * (MAX_SAMPLE_DIMS + 1)))
    with pytest.raises(ValueError, match="dimensions"):
        read_npz(deep)


def test_safetensors_headers_are_bounded() -> None:
    data = np.arange(4, dtype=np.float32).tobytes()
    header = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    assert read_safetensors(struct.pack("<Q", len(header)) + header + data)["x"].tolist() == [0, 1, 2, 3]
    shape = [1] * (MAX_SAMPLE_DIMS + 1) + [4]
    header = json.dumps({"x": {"dtype": "F32", "shape": shape, "data_offsets": [0, 16]}}).encode()
    with pytest.raises(ValueError, match="dimensions"):
        read_safetensors(struct.pack("<Q", len(header)) + header + data)
    nested = b'{"x": ' + b"[" * 50 + b"]" * 50 + b"}"
    with pytest.raises(ValueError, match="deeper"):
        read_safetensors(struct.pack("<Q", len(nested)) + nested)
    with pytest.raises(ValueError, match="header length"):
        read_safetensors(struct.pack("<Q", 2 * 1024**2) + b"{}" * 1024**2)
