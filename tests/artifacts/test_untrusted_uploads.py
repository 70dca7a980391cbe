"""Hostile uploads through POST /v1/artifacts: nothing runs, memory stays bounded, never a 500.

Every hostile file is built here from a fresh torch.export archive or numpy arrays (no binary fixtures).
The service runs in this process (TestClient), so its memory is this process's: each request's peak
RSS growth is measured by resetting the kernel's high-water mark (/proc/self/clear_refs) before it.
"""

from __future__ import annotations

import io
import json
import random
import re
import struct
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from tests import exported_models as em
from tests.live_server import live_server

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")

MB = 1024**2
RSS_GROWTH_LIMIT = 300 * MB


# --------------------------------------------------------------------------------------------------
# Helpers: uploads, memory, crafted zips


def _upload(client: TestClient, name: str, payload: bytes, kind: str, **fields: str) -> httpx.Response:
    return client.post(
        "/v1/artifacts",
        data={"kind": kind, **fields},
        files={"file": (name, payload, "application/octet-stream")},
    )


def _rss_kb(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1))  # type: ignore[union-attr]


@contextmanager
def _peak_growth() -> Iterator[list[int]]:
    """Yields a list that gets this process's peak RSS growth (bytes) while the block ran."""
    out: list[int] = []
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _rss_kb("VmRSS")
    yield out
    out.append((_rss_kb("VmHWM") - before) * 1024)


def _npy(shape: tuple[int, ...], dtype: str = "<f8", data: bytes = b"") -> bytes:
    header = {"descr": dtype, "fortran_order": False, "shape": shape}
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + data


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _good_npz() -> bytes:
    rng = np.random.default_rng(0)
    return _npz(x=rng.standard_normal((16, 1, 8, 8)).astype(np.float32), y=rng.integers(0, 10, 16))


def _safetensors(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _good_safetensors() -> bytes:
    x = np.arange(32, dtype=np.float32).reshape(8, 4)
    y = np.arange(8, dtype=np.int64) % 3
    header = {
        "x": {"dtype": "F32", "shape": [8, 4], "data_offsets": [0, x.nbytes]},
        "y": {"dtype": "I64", "shape": [8], "data_offsets": [x.nbytes, x.nbytes + y.nbytes]},
    }
    return _safetensors(header, x.tobytes() + y.tobytes())


def _many_entries_zip(entries: int) -> bytes:
    """A real zip whose central directory holds `entries` records (all naming one empty file)."""
    name = b"a"
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 0, 0, 0, 0, len(name), 0) + name
    record = (
        struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 0, 0, 0, 0, 0, 0, len(name), 0, 0, 0, 0, 0, 0)
        + name
    )
    directory = record * entries
    offset, size = len(local), len(directory)
    zip64_end = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, entries, entries, size, offset)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, offset + size, 1)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return local + directory + zip64_end + locator + end


def _lying_member(archive: bytes, member_suffix: str, inflated: bytes) -> bytes:
    """`archive` with the member ending in `member_suffix` replaced by deflated `inflated`, whose
    headers declare its original (small) size: zipfile alone would inflate all of it in one call."""
    source = zipfile.ZipFile(io.BytesIO(archive))
    target_info = next(i for i in source.infolist() if i.filename.endswith(member_suffix))
    declared = target_info.file_size
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in source.infolist():
            if info is target_info:
                info = zipfile.ZipInfo(info.filename)
                info.compress_type = zipfile.ZIP_DEFLATED
                dst.writestr(info, inflated)
            else:
                dst.writestr(info, source.read(info))
    raw = bytearray(out.getvalue())
    name = target_info.filename.encode()
    # Overwrite the uncompressed size in the local header (offset 22) and the directory record (24).
    for signature, size_at in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        start = 0
        while (start := raw.find(signature, start)) >= 0:
            name_at = start + (30 if signature == b"PK\x03\x04" else 46)
            if raw[name_at : name_at + len(name)] == name:
                raw[start + size_at : start + size_at + 4] = struct.pack("<L", declared)
            start += 4
    return bytes(raw)


def _deflate_bomb_text(size: int) -> bytes:
    return b" " * size  # JSON allows trailing whitespace: valid if it were read whole


@pytest.fixture
def limited_settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", probe_device="cpu", poll_interval_s=0.05, _env_file=None)


# --------------------------------------------------------------------------------------------------
# 1. Nothing in an uploaded archive is evaluated


def test_a_sympy_injection_is_refused_at_upload_and_when_a_job_is_forced_on_it(
    limited_settings: Settings, tmp_path: Path
) -> None:
    marker = tmp_path / "sympy.marker"
    evil = em.sympy_injection_archive(marker, tmp_path / "evil.pt2").read_bytes()
    with TestClient(create_app(limited_settings, run_worker=True)) as client:
        refused = _upload(client, "evil.pt2", evil, "model", loss="cross_entropy")
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        assert error["code"] == "unsafe_archive_content" and "models/model.json" in error["message"]
        assert client.get("/v1/artifacts").json() == []

        # Planted after upload: a clean model's stored file replaced by the malicious one.
        clean = _upload(client, "cnn.pt2", em.cnn_archive().read_bytes(), "model", loss="cross_entropy")
        assert clean.status_code == 201, clean.text
        stored = Path(limited_settings.data_dir) / "artifacts" / f"{clean.json()['id']}.pt2"
        stored.write_bytes(evil)
        job = client.post(
            "/v1/recommendations",
            json={
                "model": {"artifact_id": clean.json()["id"]},
                "dataset": {"size": 256},
                "memory_budget_bytes": 32 * MB,
                "time_budget_s": 5,
                "force": True,
            },
        )
        assert job.status_code in (200, 202), job.text
        deadline = time.monotonic() + 180
        while (body := client.get(f"/v1/recommendations/{job.json()['id']}").json())["status"] in (
            "queued",
            "running",
        ):
            assert time.monotonic() < deadline, "the forced job did not finish"
            time.sleep(0.2)
        assert body["status"] == "failed", body
        assert "unsafe_archive_content" in json.dumps(body["error"]) or "models/model.json" in json.dumps(
            body["error"]
        )
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# 3. Memory: small files that declare or inflate to huge sizes


def test_an_npz_declaring_a_huge_array_is_refused_before_anything_is_decompressed(client: TestClient) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("x.npy", _npy((10**10, 1), data=b"\0" * 64))
        archive.writestr("y.npy", _npy((10**10,), "<i8", b"\0" * 64))
    with _peak_growth() as growth:
        response = _upload(client, "huge.npz", buffer.getvalue(), "sample")
    assert response.status_code == 422, response.text
    assert "10000000000" in response.json()["error"]["message"]
    assert growth[0] < 50 * MB


def test_an_npz_that_inflates_past_its_declared_size_is_cut_off(client: TestClient) -> None:
    # The header says 16 float64 (128 bytes); the deflated member holds 200 MB.
    inflated = _npy((16,)) + b"\0" * (200 * MB)
    small = _npz(x=np.zeros(16), y=np.zeros(16, dtype=np.int64))
    bomb = _lying_member(small, "x.npy", inflated)
    assert len(bomb) < 1 * MB
    with _peak_growth() as growth:
        response = _upload(client, "bomb.npz", bomb, "sample")
    assert 400 <= response.status_code < 500, response.text
    assert growth[0] < 100 * MB, f"peak RSS grew by {growth[0] / MB:.0f} MB"


def test_a_pt2_member_lying_about_its_size_is_read_in_bounded_chunks(client: TestClient) -> None:
    archive = em.cnn_archive().read_bytes()
    bomb = _lying_member(archive, "model_weights_config.json", _deflate_bomb_text(300 * MB))
    assert len(bomb) < 2 * MB
    with _peak_growth() as growth:
        response = _upload(client, "bomb.pt2", bomb, "model", loss="cross_entropy")
    assert 400 <= response.status_code < 500, response.text
    assert growth[0] < 100 * MB, f"peak RSS grew by {growth[0] / MB:.0f} MB"


def test_a_zip_with_a_million_and_a_half_entries_is_refused_from_its_end_record(client: TestClient) -> None:
    assert len(zipfile.ZipFile(io.BytesIO(_many_entries_zip(1000))).infolist()) == 1000  # a real zip
    many = _many_entries_zip(1_500_000)
    for name, kind, fields in (("many.npz", "sample", {}), ("many.pt2", "model", {"loss": "mse"})):
        with _peak_growth() as growth:
            response = _upload(client, name, many, kind, **fields)
        assert response.status_code == 422, response.text
        assert "1500000 entries" in response.json()["error"]["message"]
        # zipfile alone: ~850 MB of ZipInfo objects. Here the 70 MB upload itself is spooled to disk.
        assert growth[0] < RSS_GROWTH_LIMIT, f"peak RSS grew by {growth[0] / MB:.0f} MB"


def test_safetensors_headers_are_bounded_in_size_and_depth(client: TestClient) -> None:
    nested = b"[" * 200_000 + b"]" * 200_000
    deep = struct.pack("<Q", len(nested)) + nested
    huge_length = struct.pack("<Q", 2**40) + b"{}"
    for name, payload, needle in (
        ("deep.safetensors", deep, "deeper"),
        ("long.safetensors", huge_length, "header"),
    ):
        response = _upload(client, name, payload, "sample")
        assert response.status_code == 422, response.text
        assert needle in response.json()["error"]["message"]


def test_deeply_nested_json_in_a_pt2_is_a_422(client: TestClient, tmp_path: Path) -> None:
    nested = "[" * 50_000 + "]" * 50_000
    config = f'{{"config": {{}}, "x": {nested}}}'.encode()
    archive = em._rewrite(
        em.cnn_archive(), tmp_path / "deep.pt2", {"data/weights/model_weights_config.json": config}
    )
    response = _upload(client, "deep.pt2", archive.read_bytes(), "model", loss="cross_entropy")
    assert response.status_code == 422, response.text
    assert "deeper" in response.json()["error"]["message"]


# --------------------------------------------------------------------------------------------------
# 4. A burst of model uploads queues without stalling the event loop


def test_a_burst_of_model_uploads_does_not_stall_health_checks(limited_settings: Settings) -> None:
    """45 concurrent uploads of one model (as in the report that found the stall): the checks queue on
    their own pool; /healthz and the artifact list keep answering while they run."""
    archive = em.cnn_archive().read_bytes()
    latencies: list[float] = []
    failures: list[str] = []
    done = threading.Event()
    with live_server(create_app(limited_settings, run_worker=False)) as url:

        def poll() -> None:
            with httpx.Client(base_url=url, timeout=30) as http:
                while not done.is_set():
                    for path in ("/healthz", "/v1/artifacts"):
                        started = time.monotonic()
                        response = http.get(path)
                        latencies.append(time.monotonic() - started)
                        if response.status_code != 200:
                            failures.append(f"{path}: {response.status_code}")
                    time.sleep(0.1)

        def upload(_: int) -> int:
            with httpx.Client(base_url=url, timeout=300) as http:
                response = http.post(
                    "/v1/artifacts",
                    data={"kind": "model", "loss": "cross_entropy"},
                    files={"file": ("cnn.pt2", archive, "application/zip")},
                )
                return response.status_code

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        started = time.monotonic()
        with ThreadPoolExecutor(45) as pool:
            statuses = list(pool.map(upload, range(45)))
        elapsed = time.monotonic() - started
        done.set()
        poller.join(60)
    print(
        f"45 uploads in {elapsed:.1f} s; {len(latencies)} health/list requests meanwhile, "
        f"slowest {max(latencies):.3f} s, median {sorted(latencies)[len(latencies) // 2]:.3f} s"
    )
    assert sorted(set(statuses)) == [200, 201] and statuses.count(201) == 1, statuses
    assert not failures, failures
    assert len(latencies) >= 4
    assert max(latencies) < 5.0  # generous: a stalled loop answered after tens of seconds


# --------------------------------------------------------------------------------------------------
# 5. Fuzz: mutated archives, .npz and .safetensors


def _flip(data: bytes, rng: random.Random, count: int, span: tuple[int, int] | None = None) -> bytes:
    out = bytearray(data)
    low, high = span or (0, len(out))
    for _ in range(count):
        position = rng.randrange(low, high)
        out[position] ^= 1 << rng.randrange(8)
    return bytes(out)


def _read_at_upload(name: str) -> bool:
    """Members the service reads itself at upload (the rest only in the dry run's subprocess)."""
    return name.endswith((".json", ".npy", "archive_format"))


def _member_spans(data: bytes) -> list[tuple[int, int]]:
    """Byte ranges the service parses at upload: those members' headers and data, the central
    directory and end record. (Flips elsewhere mostly reach the dry run: seconds each.)"""
    archive = zipfile.ZipFile(io.BytesIO(data))
    spans = []
    for info in archive.infolist():
        if _read_at_upload(info.filename):
            start = info.header_offset
            data_start = start + 30 + len(info.filename.encode()) + len(info.extra)
            spans.append((start, data_start + max(info.compress_size, 1)))
    first = data.find(b"PK\x01\x02")
    spans.append((first, len(data)))
    return spans


def _swap_members(data: bytes, rng: random.Random) -> bytes:
    source = zipfile.ZipFile(io.BytesIO(data))
    infos = source.infolist()
    parsed = [i for i, info in enumerate(infos) if _read_at_upload(info.filename)]
    a = rng.choice(parsed)
    b = rng.choice([i for i in range(len(infos)) if i != a])
    contents = [source.read(i) for i in infos]
    contents[a], contents[b] = contents[b], contents[a]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info, content in zip(infos, contents, strict=True):
            dst.writestr(info.filename, content)
    return out.getvalue()


def _mutate_program(data: bytes, rng: random.Random) -> bytes:
    """Rewrite models/model.json: random strings replaced with hostile or malformed text."""
    hostile = [
        "__import__('os').system('touch {marker}')",
        "Symbol('s77') + eval('1')",
        "torch.os.system",
        "x\r__import__('os')",
        '"); import os; ("',
        "[" * 5000,
        "Pow(Integer(10), Integer(99999999))",
        "",
    ]
    source = zipfile.ZipFile(io.BytesIO(data))
    name = next(n for n in source.namelist() if n.endswith("models/model.json"))
    text = source.read(name).decode()
    strings = list(re.finditer(r'"((?:[^"\\]|\\.)*)"', text))
    for _ in range(rng.randint(1, 3)):
        match = rng.choice(strings)
        replacement = json.dumps(rng.choice(hostile))[1:-1]
        text = text[: match.start(1)] + replacement + text[match.end(1) :]
        strings = list(re.finditer(r'"((?:[^"\\]|\\.)*)"', text))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in source.infolist():
            dst.writestr(info, text.encode() if info.filename == name else source.read(info))
    return out.getvalue()


def _bogus_npy_header(data: bytes, rng: random.Random) -> bytes:
    headers = [
        "{'descr': '|O', 'fortran_order': False, 'shape': (4,), }",
        "{'descr': '<f8', 'fortran_order': False, 'shape': (99999999999, 99999999999), }",
        "{'descr': '<f8', 'fortran_order': 'yes', 'shape': (4,), }",
        "{'descr': '<f8', 'shape': (-4,), 'fortran_order': False}",
        "__import__('os').system('touch {marker}')",
        "{'descr': [('a', '<f8')] * 100000, 'fortran_order': False, 'shape': (1,)}",
        "(" * 20000,
    ]
    text = rng.choice(headers).encode()
    payload = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text) % 65536) + text + b"\0" * 64
    source = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    victim = rng.choice(source.namelist())
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for info in source.infolist():
            dst.writestr(info.filename, payload if info.filename == victim else source.read(info))
    return out.getvalue()


def _bogus_safetensors(data: bytes, rng: random.Random) -> bytes:
    choice = rng.randrange(5)
    if choice == 0:
        return struct.pack("<Q", rng.randrange(2**64)) + data[8:]
    if choice == 1:
        header = {"x": {"dtype": "F32", "shape": [10**12, 10**12], "data_offsets": [0, 16]}}
        return _safetensors(header, b"\0" * 16)
    if choice == 2:
        header = {"x": {"dtype": "F32", "shape": [4], "data_offsets": [2**62, 2**63]}, "__metadata__": {}}
        return _safetensors(header, b"\0" * 16)
    if choice == 3:
        return _safetensors({"x": "[" * 1000}, b"")
    nested = "[" * 3000 + "]" * 3000
    raw = f'{{"x": {nested}}}'.encode()
    return struct.pack("<Q", len(raw)) + raw


FUZZ_ROUNDS = 5  # cases per (base file, mutation): 110 uploads in all


def _fuzz_cases(marker: Path, evil: bytes, seed: int = 11) -> Iterator[tuple[str, str, bytes]]:
    """(label, filename, payload): a bounded, seeded set of mutations of each kind of upload."""
    rng = random.Random(seed)
    pt2 = em.cnn_archive().read_bytes()
    npz, compressed = _good_npz(), None
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=np.zeros((64, 8), np.float32), y=np.zeros(64, np.int64))
    compressed = buffer.getvalue()
    tensors = _good_safetensors()
    hostile: list[tuple[str, Callable[[bytes], bytes]]] = [
        ("flip", lambda d: _flip(d, rng, rng.randint(1, 8), rng.choice(_member_spans(d)))),
        ("truncate", lambda d: d[: rng.randrange(1, len(d))]),
        ("swap", lambda d: _swap_members(d, rng)),
    ]
    for base_name, base in (("pt2", pt2), ("evil", evil)):
        for label, mutate in [*hostile, ("program", lambda d: _mutate_program(d, rng))]:
            for i in range(FUZZ_ROUNDS):
                payload = mutate(base).replace(b"{marker}", str(marker).encode())
                yield f"{base_name}-{label}-{i}", "model.pt2", payload
    for base_name, base in (("npz", npz), ("npz-deflated", compressed)):
        for label, mutate in [*hostile, ("header", lambda d: _bogus_npy_header(d, rng))]:
            for i in range(FUZZ_ROUNDS):
                payload = mutate(base).replace(b"{marker}", str(marker).encode())
                yield f"{base_name}-{label}-{i}", "sample.npz", payload
    for i in range(2 * FUZZ_ROUNDS):
        yield f"safetensors-flip-{i}", "sample.safetensors", _flip(tensors, rng, rng.randint(1, 6))
        yield f"safetensors-truncate-{i}", "sample.safetensors", tensors[: rng.randrange(1, len(tensors))]
        yield f"safetensors-header-{i}", "sample.safetensors", _bogus_safetensors(tensors, rng)


def test_fuzzed_uploads_never_get_a_500_run_code_or_blow_up_memory(
    limited_settings: Settings, tmp_path: Path
) -> None:
    marker = tmp_path / "fuzz.marker"
    evil = em.sympy_injection_archive(marker, tmp_path / "evil.pt2").read_bytes()
    settings = limited_settings.model_copy(update={"artifact_dry_run_timeout_s": 60.0})
    outcomes: dict[int, int] = {}
    worst = (0, "")
    slowest_health = 0.0
    with TestClient(create_app(settings, run_worker=False)) as client:
        for label, filename, payload in _fuzz_cases(marker, evil):
            kind = "model" if filename.endswith(".pt2") else "sample"
            fields = {"loss": "cross_entropy"} if kind == "model" else {}
            with _peak_growth() as growth:
                response = _upload(client, filename, payload, kind, **fields)
            assert response.status_code < 500, f"{label}: {response.status_code} {response.text[:500]}"
            if response.status_code >= 400:
                assert response.json()["error"]["code"], label
            outcomes[response.status_code] = outcomes.get(response.status_code, 0) + 1
            assert growth[0] < RSS_GROWTH_LIMIT, f"{label}: peak RSS grew by {growth[0] / MB:.0f} MB"
            worst = max(worst, (growth[0], label))
            started = time.monotonic()
            assert client.get("/healthz").status_code == 200, label
            slowest_health = max(slowest_health, time.monotonic() - started)
            assert not marker.exists(), label
    print(
        f"fuzz: {sum(outcomes.values())} uploads, statuses {dict(sorted(outcomes.items()))}, largest peak "
        f"RSS growth {worst[0] / MB:.1f} MB ({worst[1]}), slowest /healthz after one {slowest_health:.3f} s"
    )
    assert not marker.exists()
    assert sum(v for k, v in outcomes.items() if 400 <= k < 500) > sum(outcomes.values()) // 2
