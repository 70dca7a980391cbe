"""Real data for the probe's statistics: a client's uploaded sample, or a built-in one that fits the model.

The gradient noise scale and the training races need real examples: on random inputs with random
labels every example's gradient is pure noise and the noise scale means nothing. Two sources:

- A client sample: an `.npz` (loaded with `allow_pickle=False`) or `.safetensors` file holding arrays
  `x` (inputs, `[N, *input_shape]`) and `y` (targets: what the model's loss needs, checked by
  `sample_check`: class ids for cross_entropy, float targets shaped like the output for mse, ...);
  for a model with several inputs, one array per forward argument (`input_ids`, `attention_mask`)
  and the target, loaded as a `NamedInputs` batch.
  Every problem is a `ValueError` whose message the service can hand to the client as a 4xx.
- A built-in sample, flagged `measured_on="builtin:..."`: the UCI handwritten `digits` (1797 8x8 grey
  images, 10 classes; shipped as `builtin/digits.npz`, see `builtin/README.md` for its source and
  licence) for flat 64-feature models and, resized with `interpolate`, for small image models; a
  byte-level text corpus made of the Python standard library's own source for byte language models.

numpy is imported lazily inside the loaders only: the probe engine's import stays torch-only.
"""

from __future__ import annotations

import functools
import math
import os
import struct
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from service.probing import sample_check, untrusted
from service.probing.inputs import NamedInputs, rows
from service.probing.sample_check import Task

DEFAULT_MAX_FILE_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_SAMPLES = sample_check.DEFAULT_MAX_SAMPLES
BUILTIN_MAX_BYTES = 128 * 1024 * 1024  # cap on the tensor bytes of a built-in sample (large images)
DIGITS_PATH = Path(__file__).resolve().parent / "builtin" / "digits.npz"

# Standard-library modules whose source makes the built-in text corpus: prose-heavy docstrings and
# ordinary code, a few hundred KB, present in every CPython install (sorted for reproducibility).
_CORPUS_MODULES = (
    "argparse.py", "dataclasses.py", "difflib.py", "functools.py", "inspect.py", "pathlib.py",
    "textwrap.py", "typing.py", "logging/__init__.py", "collections/__init__.py",
)  # fmt: skip
CORPUS_TARGET_BYTES = 600_000


@dataclass
class Sample:
    """Inputs `x` (one tensor, or every named input) and targets `y` for the statistics, and where they
    came from."""

    x: torch.Tensor | NamedInputs
    y: torch.Tensor
    measured_on: str  # "client" or "builtin:digits" / "builtin:python-source"
    description: str

    @property
    def builtin(self) -> bool:
        return self.measured_on.startswith("builtin")

    def __len__(self) -> int:
        return rows(self.x)

    def info(self) -> dict[str, Any]:
        return {"measured_on": self.measured_on, "size": len(self), "description": self.description}


# --------------------------------------------------------------------------------------- built-in


def builtin_sample(
    input_shape: list[int], input_dtype: str, num_classes: int, *, max_bytes: int = BUILTIN_MAX_BYTES
) -> Sample | None:
    """The built-in real sample that fits this model's input, or None when none fits.

    float32 `[64]` with >= 10 classes -> digits (flat, pixels scaled to [0, 1]);
    float32 `[C, H, W]` with C in (1, 3), 8 <= H == W <= 64, >= 10 classes -> digits resized;
    int64 `[T]` with a vocabulary >= 256 -> windows of T+1 bytes of Python source (x = first T, y = last T).
    """
    shape = list(input_shape)
    if input_dtype.startswith("float") and num_classes >= 10:
        if shape == [64]:
            x, y = _digits()
            return Sample(
                x.reshape(-1, 64).clone(),
                y.clone(),
                "builtin:digits",
                "digits, 1797 8x8 images in [0, 1]",
            )
        if len(shape) == 3 and shape[0] in (1, 3) and shape[1] == shape[2] and 8 <= shape[1] <= 64:
            return _digits_images(shape[0], shape[1], max_bytes)
    if input_dtype.startswith("int") and len(shape) == 1 and num_classes >= 256:
        return _text_windows(shape[0], max_bytes)
    return None


@functools.cache
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as `[1797, 8, 8]` float32 in [0, 1] and int64 labels (loaded once; do not modify)."""
    import numpy as np  # lazy: only the loaders need it

    with np.load(DIGITS_PATH, allow_pickle=False) as digits:
        images, labels = digits["images"], digits["labels"]
    x = torch.as_tensor(images, dtype=torch.float32) / 16.0
    return x, torch.as_tensor(labels, dtype=torch.int64)


def _digits_images(channels: int, size: int, max_bytes: int) -> Sample:
    x, y = _digits()
    per_sample = channels * size * size * 4
    n = max(1, min(len(x), max_bytes // per_sample))
    x = x[:n, None]
    if size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.expand(-1, channels, -1, -1).contiguous()
    return Sample(
        x, y[:n], "builtin:digits", f"digits, {n} images resized 8x8 -> {size}x{size}, {channels} ch"
    )


def python_corpus(target_bytes: int = CORPUS_TARGET_BYTES) -> bytes:
    """A few hundred KB of English-and-code text that ships with Python: stdlib module sources."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts: list[bytes] = []
    for name in _CORPUS_MODULES:
        path = stdlib / name
        if path.is_file():
            parts.append(path.read_bytes())
        if sum(map(len, parts)) >= target_bytes:
            break
    if not parts:  # stdlib sources stripped (some minimal images): fall back to docstrings in memory
        import builtins

        docs = [getattr(builtins, n).__doc__ or "" for n in sorted(dir(builtins))]
        parts = ["\n\n".join(docs).encode()]
    return b"\n".join(parts)[:target_bytes]


def _text_windows(block_size: int, max_bytes: int, min_windows: int = 2048) -> Sample | None:
    """Cut the corpus into windows of block_size+1 bytes (overlapping when the corpus is short)."""
    data = torch.frombuffer(bytearray(python_corpus()), dtype=torch.uint8).to(torch.int64)
    span = block_size + 1
    if len(data) < 2 * span:
        return None
    stride = max(1, min(span, (len(data) - span) // min_windows))
    starts = torch.arange(0, len(data) - span + 1, stride)
    starts = starts[: max(1, max_bytes // (2 * 8 * block_size))]
    windows = data[starts[:, None] + torch.arange(span)]
    return Sample(
        windows[:, :-1].contiguous(),
        windows[:, 1:].contiguous(),
        "builtin:python-source",
        f"{len(data)} bytes of Python stdlib source, {len(starts)} windows of {span} bytes (stride {stride})",
    )


# ----------------------------------------------------------------------------------- client sample


def load_client_sample(
    path: str | os.PathLike[str],
    input_shape: list[int],
    input_dtype: str,
    num_classes: int,
    *,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    task: Task | None = None,
) -> Sample:
    """Load the inputs (`x`, or one array per named input) and the target from an `.npz` or
    `.safetensors` file and check them against the model's task (default: a zoo classifier's). Raises
    ValueError with a message meant for the client on any problem (`sample_check`)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data sample {path.name!r} not found")
    size = path.stat().st_size
    if size > max_file_bytes:
        raise ValueError(f"data sample is {size} bytes, over the limit of {max_file_bytes} bytes")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        arrays = read_npz(path)
    elif suffix == ".safetensors":
        arrays = read_safetensors(path.read_bytes())
    else:
        raise ValueError(f"data sample must be .npz or .safetensors, got {suffix or 'no extension'!r}")
    if task is None:
        task = Task.for_model(None, input_shape=input_shape, input_dtype=input_dtype, num_classes=num_classes)
    x, y = sample_check.prepare_arrays(arrays, task, max_samples=max_samples)
    return Sample(x, y, "client", f"client sample {path.name}, {rows(x)} examples")


MAX_SAMPLE_ARRAYS = 64
MAX_SAMPLE_DIMS = 16
MAX_SAFETENSORS_HEADER_BYTES = 1024**2
MAX_SAFETENSORS_HEADER_DEPTH = 8


def read_npz(path: Path, *, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> dict[str, torch.Tensor]:
    """Arrays of an .npz as tensors, read member by member without numpy's loader, never unpickling.

    The zip's end record is checked before its directory is parsed; each member's `.npy` header is read
    first and the array refused by its declared shape x itemsize (object dtypes: refused, they are
    pickles) before a byte of data is decompressed; the data is then read in chunks into an array of
    exactly the declared size, so a member that lies about its size cannot inflate past it.
    """
    import numpy as np  # lazy: only the loader needs it

    arrays: dict[str, torch.Tensor] = {}
    total = 0
    try:
        with untrusted.open_zip(
            path, max_entries=MAX_SAMPLE_ARRAYS, max_directory_bytes=64 * 1024, what=".npz data sample"
        ) as archive:
            for info in archive.infolist():
                if info.is_dir():
                    continue
                key = info.filename.removesuffix(".npy")  # the names np.load gives them
                what = f"array {key!r}"
                with archive.open(info) as member:
                    dtype, shape, fortran = untrusted.read_npy_header(member, what=what)
                    if dtype.kind not in "biuf":
                        raise untrusted.InputRefused(
                            "sample_refused", f"array {key!r} must be numeric, got dtype {dtype}"
                        )
                    if len(shape) > MAX_SAMPLE_DIMS:
                        raise untrusted.InputRefused(
                            "sample_refused", f"{what} has {len(shape)} dimensions, over {MAX_SAMPLE_DIMS}"
                        )
                    nbytes = untrusted.declared_bytes(shape, dtype.itemsize)
                    total += nbytes
                    if total > max_bytes:
                        raise untrusted.InputRefused(
                            "sample_refused",
                            f"{what} declares shape {list(shape)} of {dtype} ({nbytes} bytes): the data "
                            f"sample would unpack to more than the limit of {max_bytes} bytes",
                        )
                    flat = np.empty(nbytes // dtype.itemsize if dtype.itemsize else 0, dtype=dtype)
                    buffer = memoryview(flat).cast("B")  # type: ignore[arg-type]  # ndarray implements the buffer protocol
                    untrusted.read_member_into(member, buffer, what=what)
                array = flat.reshape(shape, order="F" if fortran else "C")
                if not dtype.isnative:
                    array = array.astype(dtype.newbyteorder("="))
                arrays[key] = torch.from_numpy(np.ascontiguousarray(array))
    except untrusted.InputRefused as exc:
        if exc.code == "pickled_content":
            raise ValueError("data sample holds pickled (object) arrays, which are refused") from None
        if exc.code == "sample_refused":
            raise ValueError(exc.message) from None
        raise ValueError(f"cannot read .npz data sample: {exc.message}") from None
    except untrusted.ZIP_ERRORS as exc:  # opening a member: bad header, encrypted, unknown method
        raise ValueError(f"cannot read .npz data sample: {exc}") from None
    return arrays


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def read_safetensors(blob: bytes) -> dict[str, torch.Tensor]:
    """Parse a safetensors file (8-byte header length, JSON header, raw little-endian data).

    A small parser of our own rather than the `safetensors` package: the format holds no code, and
    every offset is checked against the buffer so a truncated or hostile file is a ValueError. The
    header is bounded in size and JSON nesting depth before it is parsed.
    """
    if len(blob) < 8:
        raise ValueError("cannot read .safetensors data sample: file too short")
    (header_len,) = struct.unpack("<Q", blob[:8])
    if header_len > len(blob) - 8 or header_len > MAX_SAFETENSORS_HEADER_BYTES:
        raise ValueError(
            f"cannot read .safetensors data sample: bad header length {header_len} (at most "
            f"{MAX_SAFETENSORS_HEADER_BYTES} bytes and within the file)"
        )
    try:
        header = untrusted.loads_json(
            blob[8 : 8 + header_len], max_depth=MAX_SAFETENSORS_HEADER_DEPTH, what="the header"
        )
    except untrusted.InputRefused as exc:
        raise ValueError(f"cannot read .safetensors data sample: {exc.message}") from None
    if not isinstance(header, dict):
        raise ValueError("cannot read .safetensors data sample: header is not an object")
    if len(header) > MAX_SAMPLE_ARRAYS + 1:
        raise ValueError(f"cannot read .safetensors data sample: more than {MAX_SAMPLE_ARRAYS} arrays")
    data = memoryview(blob)[8 + header_len :]
    out: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"array {name[:80]!r}: unsupported or malformed entry") from None
        if len(shape) > MAX_SAMPLE_DIMS:
            raise ValueError(f"array {name[:80]!r} has {len(shape)} dimensions, over {MAX_SAMPLE_DIMS}")
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if any(s < 0 for s in shape) or not 0 <= begin <= end <= len(data) or end - begin != nbytes:
            raise ValueError(f"array {name[:80]!r}: offsets do not match its shape and dtype")
        flat = (
            torch.frombuffer(bytearray(data[begin:end]), dtype=dtype)
            if nbytes
            else torch.empty(0, dtype=dtype)
        )
        out[name] = flat.reshape(shape)
    return out


def sample_for_model(
    input_shape: list[int],
    input_dtype: str,
    num_classes: int,
    sample_path: str | os.PathLike[str] | None = None,
    task: Task | None = None,
    **limits: int,
) -> Sample | None:
    """The client's sample when a path is given (checked against `task`, default a zoo classifier's;
    ValueError on problems), else a built-in one (built-ins are class ids: classifiers only).

    None means no real data fits this model: the statistics phases must be skipped and the answer says so.
    """
    if sample_path is not None:
        return load_client_sample(sample_path, input_shape, input_dtype, num_classes, task=task, **limits)
    if task is not None and (task.loss not in sample_check.CLASSIFICATION_LOSSES or task.inputs):
        return None  # built-ins are class ids for one input
    return builtin_sample(input_shape, input_dtype, num_classes)
