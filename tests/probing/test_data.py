"""Built-in samples and client sample loading/validation (service/probing/data.py)."""

from __future__ import annotations

import ast
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from service.probing import data

ROOT = Path(__file__).resolve().parents[2]
MLP = ([64], "float32", 10)
GPT = ([16], "int64", 256)


# ------------------------------------------------------------------------------------------ built-in


def test_digits_for_a_flat_64_feature_model():
    s = data.builtin_sample(*MLP)
    assert s is not None and s.builtin and s.measured_on == "builtin:digits"
    assert s.x.shape == (1797, 64) and s.x.dtype == torch.float32
    assert float(s.x.min()) >= 0.0 and float(s.x.max()) <= 1.0
    assert s.y.dtype == torch.int64 and set(s.y.tolist()) == set(range(10))



def test_digits_load_without_scikit_learn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # any import of it now fails
    data._digits.cache_clear()
    try:
        x, y = data._digits()
    finally:
        data._digits.cache_clear()
    assert x.shape == (1797, 8, 8) and y.shape == (1797,)


def test_shipped_digits_are_scikit_learns():
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x, y = data._digits()
    assert np.array_equal(x.numpy() * 16, digits.images) and np.array_equal(y.numpy(), digits.target)
    assert (ROOT / "service" / "probing" / "builtin" / "README.md").read_text().count("CC BY 4.0") == 1


@pytest.mark.parametrize("shape", [[1, 8, 8], [3, 32, 32], [1, 16, 16]])
def test_digits_resized_for_small_image_models(shape):
    s = data.builtin_sample(shape, "float32", 10)
    assert s is not None and s.measured_on == "builtin:digits"
    assert list(s.x.shape[1:]) == shape and len(s.x) == len(s.y)
    assert torch.isfinite(s.x).all()


def test_big_images_respect_the_memory_cap():
    s = data.builtin_sample([3, 64, 64], "float32", 10, max_bytes=3 * 64 * 64 * 4 * 100)
    assert s is not None and len(s) == 100


@pytest.mark.parametrize(
    "args",
    [
        ([3, 224, 224], "float32", 10),  # too large to say anything about real images
        ([100], "float32", 10),  # no 100-feature built-in
        ([64], "float32", 5),  # digits has 10 classes
        ([2, 8, 8], "float32", 10),  # 2 channels
        ([16], "int64", 100),  # bytes need a vocabulary of 256
    ],
)
def test_no_builtin_when_nothing_fits(args):
    assert data.builtin_sample(*args) is None


def test_text_windows_are_next_byte_targets():
    s = data.builtin_sample(*GPT)
    assert s is not None and s.measured_on == "builtin:python-source"
    assert s.x.shape == s.y.shape and s.x.shape[1] == 16 and len(s) >= 2048
    assert torch.equal(s.x[:, 1:], s.y[:, :-1])
    assert int(s.x.max()) < 256 and int(s.x.min()) >= 0


def test_corpus_is_a_few_hundred_kb_of_text():
    corpus = data.python_corpus()
    assert 200_000 <= len(corpus) <= data.CORPUS_TARGET_BYTES
    assert b"def " in corpus


def test_probing_modules_stay_free_of_numpy_sklearn_and_the_web_stack():
    """numpy/safetensors only inside functions; never sklearn, fastapi, pydantic or sqlalchemy."""
    banned = {"numpy", "sklearn", "fastapi", "pydantic", "sqlalchemy", "safetensors"}
    for name in ("data", "noise", "races", "recipe"):
        tree = ast.parse((ROOT / "service" / "probing" / f"{name}.py").read_text())
        for node in tree.body:  # module level only
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not {n.split(".")[0] for n in names} & banned, (name, names)
    for path in [*(ROOT / "service" / "probing").glob("*.py"), *(ROOT / "models").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):  # anywhere, lazily or not
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert "sklearn" not in {n.split(".")[0] for n in names}, path


# ------------------------------------------------------------------------------------- client sample


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _safetensors(path: Path, **arrays: np.ndarray) -> Path:
    """A minimal safetensors writer (independent of the reader under test)."""
    codes = {"float32": "F32", "float64": "F64", "int64": "I64", "int32": "I32", "uint8": "U8"}
    header, blobs, offset = {}, [], 0
    for name, arr in arrays.items():
        raw = np.ascontiguousarray(arr).tobytes()
        header[name] = {
            "dtype": codes[str(arr.dtype)],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))
    return path


def _good(n: int = 20) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random((n, 64), dtype=np.float32), rng.integers(0, 10, n)


def test_npz_round_trip(tmp_path):
    x, y = _good()
    s = data.load_client_sample(_npz(tmp_path / "s.npz", x=x, y=y), *MLP)
    assert s.measured_on == "client" and not s.builtin
    assert s.x.dtype == torch.float32 and s.y.dtype == torch.int64
    assert torch.allclose(s.x, torch.from_numpy(x)) and s.y.tolist() == y.tolist()


def test_float64_inputs_are_cast_to_the_model_dtype(tmp_path):
    x, y = _good()
    s = data.load_client_sample(_npz(tmp_path / "s.npz", x=x.astype(np.float64), y=y), *MLP)
    assert s.x.dtype == torch.float32


def test_safetensors_round_trip(tmp_path):
    x, y = _good()
    s = data.load_client_sample(_safetensors(tmp_path / "s.safetensors", x=x, y=y), *MLP)
    assert torch.allclose(s.x, torch.from_numpy(x)) and s.y.tolist() == y.tolist()


def test_safetensors_written_by_the_library(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    x, y = _good()
    st.save_file({"x": x, "y": y.astype(np.int64)}, str(tmp_path / "s.safetensors"), metadata={"a": "b"})
    s = data.load_client_sample(tmp_path / "s.safetensors", *MLP)
    assert torch.allclose(s.x, torch.from_numpy(x))


def test_token_sample_for_a_language_model(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 256, (10, 17))
    s = data.load_client_sample(_npz(tmp_path / "t.npz", x=tokens[:, :-1], y=tokens[:, 1:]), *GPT)
    assert s.x.dtype == torch.int64 and s.y.shape == (10, 16)


def _bad_cases(tmp_path):
    x, y = _good()
    obj = np.array([{"a": 1}] * 20, dtype=object)
    yield "shape", _npz(tmp_path / "a.npz", x=x[:, :32], y=y)
    yield "must lie in", _npz(tmp_path / "b.npz", x=x, y=y + 10)
    y_neg = y.copy()
    y_neg[0] = -1
    yield "must lie in", _npz(tmp_path / "c.npz", x=x, y=y_neg)
    x_nan = x.copy()
    x_nan[3, 3] = np.nan
    yield "NaN", _npz(tmp_path / "d.npz", x=x_nan, y=y)
    x_inf = x.copy()
    x_inf[0, 0] = np.inf
    yield "infinite", _npz(tmp_path / "e.npz", x=x_inf, y=y)
    yield "empty", _npz(tmp_path / "f.npz", x=x[:0], y=y[:0])
    yield "must be numeric", _npz(tmp_path / "g.npz", x=np.array([["a"] * 64] * 20), y=y)
    np.savez(tmp_path / "h.npz", x=obj, y=y)  # pickle-bearing: numpy pickles object arrays
    yield "pickled", tmp_path / "h.npz"
    yield "missing", _npz(tmp_path / "i.npz", x=x)
    yield "integers", _npz(tmp_path / "j.npz", x=x, y=y.astype(np.float32))
    yield "examples but y", _npz(tmp_path / "k.npz", x=x, y=y[:5])
    yield ".npz or .safetensors", _npz(tmp_path / "l.npz", x=x, y=y).rename(tmp_path / "l.pkl")
    (tmp_path / "m.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    yield "header length", tmp_path / "m.safetensors"
    p = _safetensors(tmp_path / "n.safetensors", x=x, y=y)
    p.write_bytes(p.read_bytes()[:-8])  # truncated data
    yield "offsets", p
    (tmp_path / "o.npz").write_bytes(b"not a zip at all")
    yield "not a zip archive", tmp_path / "o.npz"
    yield "not found", tmp_path / "missing.npz"


def test_bad_samples_raise_clear_value_errors(tmp_path):
    for expected, path in _bad_cases(tmp_path):
        with pytest.raises(ValueError, match=expected):
            data.load_client_sample(path, *MLP)


def test_token_ids_out_of_vocabulary(tmp_path):
    tokens = np.full((4, 17), 300)
    with pytest.raises(ValueError, match="token ids"):
        data.load_client_sample(_npz(tmp_path / "t.npz", x=tokens[:, :-1], y=tokens[:, 1:] % 256), *GPT)


def test_size_limits(tmp_path):
    x, y = _good(50)
    path = _npz(tmp_path / "s.npz", x=x, y=y)
    with pytest.raises(ValueError, match="over the limit of 100 bytes"):
        data.load_client_sample(path, *MLP, max_file_bytes=100)
    with pytest.raises(ValueError, match="50 examples, over the limit of 10"):
        data.load_client_sample(path, *MLP, max_samples=10)


def test_sample_for_model_prefers_the_client_sample(tmp_path):
    x, y = _good()
    path = _npz(tmp_path / "s.npz", x=x, y=y)
    assert data.sample_for_model(*MLP, sample_path=path).measured_on == "client"
    assert data.sample_for_model(*MLP).measured_on == "builtin:digits"
    assert data.sample_for_model([100], "float32", 10) is None


def test_a_built_in_models_sample_leaves_out_targets_equal_to_the_requests_ignore_index(tmp_path):
    from service.probing.sample_check import IGNORE_INDEX, Task

    y = np.arange(12, dtype=np.int64) % 10
    y[::3] = 99  # padding, not one of the 10 classes
    path = tmp_path / "padded.npz"
    np.savez(path, x=np.zeros((12, 64), np.float32), y=y)
    with pytest.raises(ValueError, match="class ids"):
        data.load_client_sample(path, [64], "float32", 10)
    task = Task.for_model(None, input_shape=[64], input_dtype="float32", num_classes=10, ignore_index=99)
    sample = data.load_client_sample(path, [64], "float32", 10, task=task)
    assert sorted(sample.y.tolist()) == sorted(IGNORE_INDEX if v == 99 else int(v) for v in y)
