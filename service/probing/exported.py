"""Bring your own model: a `torch.export` archive (`.pt2`) trained by the probe like a zoo model.

The client exports its model in train mode with a dynamic batch dimension and saves it::

    batch = torch.export.Dim("batch")
    program = torch.export.export(model.train(), (example,), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, "model.pt2")

Safety. `torch.export.load` unpickles weights and constants marked `"use_pickle": true`, pickled
Python/TorchScript objects among the constants, legacy `*.pt` payloads, and the archive's sample
inputs (with a `weights_only=False` fallback). So:

- `inspect_archive` reads the zip with `zipfile` and `json` only (bounded: `service.probing.untrusted`)
  and refuses every one of those (the service calls it before anything else; it never imports
  torch's loader).
- The deserializer also *evaluates* text from the program's JSON: symbolic-shape expressions go to
  `sympy.sympify` (Python `eval`), node targets are looked up on `torch` and called, names become
  generated Python source, tree specs can import modules. `check_program_json` (part of the
  inspection) refuses the archive (`unsafe_archive_content`, naming the member) unless every string
  is inert: expressions within the grammar `sympy.srepr` writes, targets among the operators
  torch.export emits, names plain tokens.
- `load_program` (probe subprocess only) re-inspects, then rebuilds the program from the raw weight
  bytes and the graph JSON bytes it just checked: the sample inputs are never read, and `torch.load`,
  `pickle.load(s)` and torch's object unpickler are replaced by a function that refuses while it runs.

The training task comes with the upload: `loss` is `cross_entropy` (logits `[B, ..., C]`, integer
targets `[B, ...]`), `mse`, `l1` or `huber` (float targets shaped like the output) or
`model_returns_loss` (`forward(x, target)` returns the scalar loss, or a tuple/dict whose first
item/"loss" is). Inputs and targets are synthesised from the program's own input specs
(`input`/`target`: per-sample `shape`, `dtype`, and `high`, the exclusive bound of integer values such
as token ids).

`python -m service.probing.exported` is the dry run's entry point: a JSON request on stdin
(`{"path", "declared"}`), JSON lines out (`{"event": "result", ...}` or `{"event": "error", ...}`),
exactly like `service.probing.runner`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import pickle
import re
import sys
import traceback
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import IO, Any

import torch
import torch.nn.functional as F
from torch import nn

from models.base import ModelSpec, randint, randn
from service.probing import guard_code, untrusted
from service.probing.spec import ProbeError, ProbeSpec

LOSSES = ("cross_entropy", "mse", "l1", "huber", "model_returns_loss")
REGRESSION_LOSSES = ("mse", "l1", "huber")  # float targets shaped like the output
DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")
MODEL_NAME = "model"  # torch.export.save stores its one program under this name
DEFAULT_MAX_UNCOMPRESSED_BYTES = 1024**3
MAX_ENTRIES = 20_000  # one file per weight: far more than any real model has
MAX_CONFIG_BYTES = 32 * 1024**2  # models/model.json and the weights/constants configs, each
MAX_JSON_DEPTH = 64  # torch.export's JSON nests ~10 levels, more with nested subgraphs
DRY_RUN_BATCH_SIZES = (2, 3, 1)  # 2 and 3: the batch dimension is dynamic; 1: where the probe starts

_TOP_LEVEL_FILES = {"archive_format", "archive_version", "byteorder", "version"}
_ALLOWED_DIRS = (".data/", "models/", "data/weights/", "data/constants/", "data/sample_inputs/", "extra/")
_CODE_DIRS = ("data/aotinductor/", "data/executorch/", "data/mtia", "xl_model_weights/")
_PAYLOAD_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class ArchiveError(untrusted.InputRefused):
    """A refused archive, with a stable code and a message meant for the client."""


# --------------------------------------------------------------------------------------------------
# Inspection: zipfile and json only (safe in the service process)


def inspect_archive(
    path: str | os.PathLike[str], *, max_uncompressed_bytes: int = DEFAULT_MAX_UNCOMPRESSED_BYTES
) -> dict[str, Any]:
    """Check that `path` is a torch.export archive this service can load without running any of it.

    Raises ArchiveError: not_a_zip, too_many_entries, not_an_export_archive, archive_too_large,
    member_too_large, pickled_content, unsafe_archive_content, unsupported_archive_content,
    weights_not_on_cpu. Returns a summary of the layout.
    """
    return _inspect(path, max_uncompressed_bytes)[0]


def _inspect(path: str | os.PathLike[str], max_uncompressed_bytes: int) -> tuple[dict[str, Any], bytes]:
    """(layout summary, the checked bytes of models/model.json)."""
    try:
        with untrusted.open_zip(path, max_entries=MAX_ENTRIES, what="archive") as archive:
            return _inspect_zip(archive, max_uncompressed_bytes)
    except ArchiveError:
        raise
    except untrusted.InputRefused as exc:
        if exc.code == "not_a_zip":
            raise ArchiveError(
                "not_a_zip",
                f"{exc.message}; upload the .pt2 file written by torch.export.save",
            ) from None
        raise ArchiveError(exc.code, exc.message) from None
    except untrusted.ZIP_ERRORS as exc:
        raise ArchiveError("not_a_zip", f"the zip archive cannot be read: {exc}") from None
    except (TypeError, AttributeError, KeyError, IndexError, RecursionError) as exc:
        # A shape of JSON the checks above did not foresee: still the client's malformed file.
        raise _layout(f"malformed content ({type(exc).__name__}: {str(exc)[:200]})") from None


def _inspect_zip(archive: zipfile.ZipFile, max_uncompressed_bytes: int) -> tuple[dict[str, Any], bytes]:
    infos = archive.infolist()
    total = sum(info.file_size for info in infos)
    if total > max_uncompressed_bytes:
        raise ArchiveError(
            "archive_too_large",
            f"the archive unpacks to {total} bytes, over the limit of {max_uncompressed_bytes} bytes",
        )
    names = [info.filename for info in infos if not info.is_dir()]
    roots = {name.split("/", 1)[0] for name in names}
    if len(roots) != 1 or any("/" not in name for name in names):
        raise _layout("its files do not share one top-level folder")
    root = roots.pop()
    files = {name[len(root) + 1 :]: name for name in names}

    def read(relative: str, limit: int = MAX_CONFIG_BYTES) -> bytes:
        # Chunked, with a running cap: a member lying about its size cannot inflate past `limit`.
        return untrusted.read_member(archive, archive.getinfo(files[relative]), limit=limit, what=relative)

    for required in ("archive_format", f"models/{MODEL_NAME}.json"):
        if required not in files:
            raise _layout(f"{required} is missing")
    for relative in files:
        _check_allowed(relative)
    if read("archive_format", 64).strip() != b"pt2":
        raise _layout("archive_format is not 'pt2'")
    programs = sorted(r for r in files if r.startswith("models/"))
    if programs != [f"models/{MODEL_NAME}.json"]:
        raise ArchiveError(
            "unsupported_archive_content",
            f"the archive must hold exactly one exported program (models/{MODEL_NAME}.json), "
            f"found {programs}",
        )
    counts = {}
    for kind, directory in (("weights", "data/weights/"), ("constants", "data/constants/")):
        legacy = f"{directory}{MODEL_NAME}.pt"
        if legacy in files:
            raise ArchiveError(
                "pickled_content",
                f"{legacy} is a legacy pickled {kind} file; save the program again with a current "
                "torch.export.save",
            )
        config_name = f"{directory}{MODEL_NAME}_{kind}_config.json"
        if config_name not in files:
            raise _layout(f"{config_name} is missing")
        counts[kind] = _check_payload_config(kind, directory, config_name, read(config_name), files)
    program_name = f"models/{MODEL_NAME}.json"
    program = read(program_name)
    check_program_json(program, program_name)
    layout = {
        "root": root,
        "entries": len(names),
        "uncompressed_bytes": total,
        "weights": counts["weights"],
        "constants": counts["constants"],
    }
    return layout, program


def _layout(problem: str) -> ArchiveError:
    return ArchiveError(
        "not_an_export_archive",
        f"the zip archive is not a torch.export archive ({problem}); save the program with torch.export.save",
    )


def _check_allowed(relative: str) -> None:
    if relative.startswith(_CODE_DIRS):
        raise ArchiveError(
            "unsupported_archive_content",
            f"the archive holds compiled or external artifacts ({relative}); upload a plain "
            "torch.export.save archive (no AOTInductor/ExecuTorch packages)",
        )
    if relative in _TOP_LEVEL_FILES or relative.startswith(_ALLOWED_DIRS):
        return
    raise ArchiveError(
        "unsupported_archive_content", f"unexpected file {relative!r} in the torch.export archive"
    )


def _load_json(raw: bytes, member: str) -> Any:
    try:
        return untrusted.loads_json(raw, max_depth=MAX_JSON_DEPTH, what=member)
    except untrusted.InputRefused as exc:
        raise _layout(exc.message) from None


def _check_payload_config(
    kind: str, directory: str, config_name: str, raw: bytes, files: dict[str, str]
) -> int:
    """Refuse pickled payloads (weights/constants marked use_pickle, pickled objects) and non-CPU tensors."""
    config = _load_json(raw, config_name)
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise _layout(f"{config_name} has no 'config' object")
    _check_member_strings(config, config_name)
    singular = kind[:-1]
    for fqn, entry in entries.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("path_name"), str):
            raise _layout(f"{config_name}: entry {fqn!r} is malformed")
        if entry.get("use_pickle", False) is not False:
            raise ArchiveError(
                "pickled_content",
                f'{singular} {fqn!r} is stored as a pickle ("use_pickle": true in {config_name}); '
                "pickles can run code and are refused. Keep weights and constants plain dense tensors "
                "(no tensor subclasses or quantized tensors) and export again",
            )
        path_name = entry["path_name"]
        if kind == "constants" and not path_name.startswith("tensor_"):
            raise ArchiveError(
                "pickled_content",
                f"constant {fqn!r} is a pickled Python or TorchScript object ({path_name}), which is "
                "refused; only tensor constants are accepted",
            )
        if not _PAYLOAD_NAME.match(path_name) or f"{directory}{path_name}" not in files:
            raise _layout(f"{singular} {fqn!r} points at a missing file {directory}{path_name}")
        meta = entry.get("tensor_meta")
        device_entry = meta.get("device") if isinstance(meta, dict) else None
        device = device_entry.get("type", "cpu") if isinstance(device_entry, dict) else "cpu"
        if device != "cpu":
            raise ArchiveError(
                "weights_not_on_cpu",
                f"{singular} {fqn!r} was saved on {device!r}; export the model on the CPU "
                "(model.cpu() and a CPU example input): the probe moves it to its own device",
            )
    return len(entries)


# --------------------------------------------------------------------------------------------------
# The program's JSON: nothing in it may reach an evaluator
#
# torch's deserializer hands every `expr_str` (symbolic sizes, strides, sym int/float/bool values) to
# `sympy.sympify`, which runs Python `eval`; it resolves node targets by attribute lookup on `torch`
# (`torch.os.system` is reachable) and calls any callable it finds; names become Python source in the
# GraphModule's generated `forward`; tree specs may import modules by name (`"__enum__"` contexts).
# So before torch reads a byte, every string in models/model.json is checked by where it sits:
# expressions against the grammar of what `sympy.srepr` writes, node targets against the operators
# torch.export emits, tree specs against the container types it writes, free text (metadata,
# string arguments) for control characters, and every other string (names, keys) against a plain
# token pattern that cannot close a quote or start a statement.


class _Unsafe(Exception):
    """A string in the program refused by the checks below (becomes unsafe_archive_content)."""


_TOKEN = re.compile(r"^[A-Za-z0-9_.:+\-]{0,512}$")
_FREE_TEXT_BAD = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u2028\u2029]")
_MAX_FREE_TEXT = 1024**2
# Node targets torch.export writes: aten operators, higher-order operators, and the symbolic ops
# `serialize_operator` spells for Python's operator/math functions (serialize.py's _SYM_OPS).
_ATEN_TARGET = re.compile(r"^torch\.ops\.aten\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+$")
_HOP_TARGET = re.compile(r"^torch\.ops\.higher_order\.([A-Za-z0-9_]+)$")
_SYM_TARGETS = frozenset(
    [f"_operator.{n}" for n in (
        "add", "and_", "eq", "floordiv", "ge", "gt", "le", "lshift", "lt", "mod", "mul", "ne", "neg",
        "or_", "pos", "pow", "rshift", "sub", "truediv",
    )]
    + ["_operator.getitem", "_operator.not_", "_operator.abs", "math.trunc", "math.ceil", "math.floor",
       "builtins.round", "torch._sym_sqrt", "torch.sym_float", "torch.sym_int", "torch.sym_ite",
       "torch.sym_max", "torch.sym_min", "torch.sym_not", "torch.sym_sqrt", "torch.sym_sum",
       "torch._C._set_grad_enabled", "torch.amp.autocast_mode._enter_autocast",
       "torch.amp.autocast_mode._exit_autocast"]
)  # fmt: skip
_HIGHER_ORDER = frozenset(
    {"cond", "while_loop", "map_impl", "scan", "associative_scan", "wrap_with_set_grad_enabled",
     "wrap_with_autocast", "invoke_subgraph", "flex_attention", "auto_functionalized",
     "auto_functionalized_v2"}
)  # fmt: skip
_ATEN_REFUSED = frozenset({"from_file", "save", "_print", "load"})
# Tree specs: the container types torch.export writes for inputs and outputs.
_SPEC_TYPES = frozenset(
    {None, "builtins.tuple", "builtins.list", "builtins.dict", "collections.OrderedDict",
     "torch.fx.immutable_collections.immutable_list", "torch.fx.immutable_collections.immutable_dict"}
)  # fmt: skip


def check_program_json(raw: bytes, member: str) -> Any:
    """Parse the program's JSON and refuse it unless every string in it is inert (see above)."""
    data = _load_json(raw, member)
    _check_member_strings(data, member)
    return data


def _check_member_strings(data: Any, member: str) -> None:
    try:
        _check_strings(data, member, ())
    except _Unsafe as exc:
        raise ArchiveError("unsafe_archive_content", f"{member}: {exc}") from None


def _check_strings(value: Any, member: str, path: tuple[str, ...]) -> None:
    """Walk the JSON: each string is checked by the rule for its position (`path` = enclosing keys)."""
    key = path[-1] if path else ""
    if isinstance(value, dict):
        is_node = "target" in value and "inputs" in value
        for name, item in value.items():
            if key != "metadata" and not _TOKEN.match(name):
                raise _Unsafe(f"unexpected name {name[:80]!r} at {_where(path)}")
            if is_node and name == "target":
                _check_target(item)
            else:
                _check_strings(item, member, (*path, name))
    elif isinstance(value, list):
        for item in value:
            _check_strings(item, member, path)
    elif isinstance(value, str):
        if key == "expr_str":
            check_sympy_expression(value)
        elif key == "as_operator":
            _check_target(value)
        elif key in ("in_spec", "out_spec"):
            _check_treespec(value)
        elif key == "guards_code":  # Python source the loader execs: only shape guards pass
            try:
                guard_code.check_guard_code(value)
            except ValueError as exc:
                raise _Unsafe(f"{exc} at {_where(path)}") from None
        elif "metadata" in path or key in ("as_string", "as_strings"):
            _check_free_text(value, path)
        elif not _TOKEN.match(value):
            raise _Unsafe(f"unexpected text {value[:80]!r} at {_where(path)}")


def _where(path: tuple[str, ...]) -> str:
    return ".".join(path[-4:]) or "the top level"


def _check_free_text(value: str, path: tuple[str, ...]) -> None:
    if len(value) > _MAX_FREE_TEXT or _FREE_TEXT_BAD.search(value):
        raise _Unsafe(f"control characters or oversized text at {_where(path)}")
    if path and path[-1] in ("custom", "from_node"):  # parsed as JSON by the deserializer
        try:
            untrusted.loads_json(value, max_depth=MAX_JSON_DEPTH, what=path[-1])
        except untrusted.InputRefused as exc:
            raise _Unsafe(exc.message) from None


def _check_target(target: Any) -> None:
    if not isinstance(target, str):
        raise _Unsafe(f"a node target is not a string: {str(target)[:80]!r}")
    if _ATEN_TARGET.match(target):
        if target.split(".")[3] in _ATEN_REFUSED:
            raise _Unsafe(f"operator {target!r} reads or writes files and is refused")
        return
    hop = _HOP_TARGET.match(target)
    if (hop and hop.group(1) in _HIGHER_ORDER) or target in _SYM_TARGETS:
        return
    raise _Unsafe(
        f"node target {target[:120]!r} is not an operator torch.export emits (aten, higher-order or "
        "symbolic-size ops); custom operators and Python callables are refused"
    )


def _check_treespec(text: str) -> None:
    """A serialized pytree spec: `[1, {"type", "context", "children_spec"}]` of known containers only."""
    try:
        spec = untrusted.loads_json(text, max_depth=MAX_JSON_DEPTH, what="a tree spec")
    except untrusted.InputRefused as exc:
        raise _Unsafe(exc.message) from None
    if not (isinstance(spec, list) and len(spec) == 2 and spec[0] == 1):
        raise _Unsafe("a tree spec has an unknown format")
    _check_treespec_node(spec[1])


def _check_treespec_node(node: Any) -> None:
    if not isinstance(node, dict) or set(node) != {"type", "context", "children_spec"}:
        raise _Unsafe("a tree spec node is malformed")
    if not isinstance(node["type"], str | None) or node["type"] not in _SPEC_TYPES:
        raise _Unsafe(f"a tree spec names the type {str(node['type'])[:80]!r}, which is refused")
    context = node["context"]
    if context is not None:
        if not isinstance(context, str):
            raise _Unsafe("a tree spec context is malformed")
        try:
            parsed = untrusted.loads_json(context, max_depth=8, what="a tree spec context")
        except untrusted.InputRefused as exc:
            raise _Unsafe(exc.message) from None
        # Contexts are decoded with an object hook that imports modules named in "__enum__" objects.
        if not _plain_context(parsed):
            raise _Unsafe("a tree spec context holds objects; only names and lists of names are accepted")
    children = node["children_spec"]
    if not isinstance(children, list):
        raise _Unsafe("a tree spec node is malformed")
    for child in children:
        _check_treespec_node(child)


def _plain_context(value: Any) -> bool:
    if isinstance(value, list):
        return all(_plain_context(item) for item in value)
    return value is None or isinstance(value, str | int | float | bool)


# Symbolic expressions, as `sympy.srepr` writes them (`Mul(Integer(16), Symbol('s95', positive=True,
# integer=True))`) or as older torch versions wrote them with `str` (`16*s95`): parsed here by a
# small recursive-descent parser that evaluates nothing. Only these names may be called; only symbol
# names (s0, u12, ...) and these constants may stand alone; strings only as a Symbol's name or a
# Float's digits; numbers bounded so that sympy's exact arithmetic stays small.
_SYMPY_FUNCTIONS = frozenset(
    {
        # sympy classes srepr writes
        "Symbol", "Integer", "Float", "Rational", "Add", "Mul", "Pow", "Max", "Min", "Mod", "Abs",
        "Equality", "Unequality", "StrictLessThan", "LessThan", "StrictGreaterThan", "GreaterThan",
        "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "Piecewise", "ExprCondPair",
        "floor", "ceiling", "sqrt",
        # torch.utils._sympy.functions, as the deserializer registers them
        "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt",
        "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
        "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt",
        "RoundDecimal", "ToFloat", "Identity",
    }
)  # fmt: skip
_SYMPY_CONSTANTS = frozenset({"oo", "zoo", "nan", "int_oo", "true", "false", "True", "False"})
_POWER_FUNCTIONS = frozenset({"Pow", "PowByNatural", "FloatPow", "LShift", "RShift"})
_SYMBOL_NAME = re.compile(r"^[a-z]+[0-9]+$")
_QUOTED_SYMBOL = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
_FLOAT_DIGITS = re.compile(
    r"^[+-]?([0-9]{1,40}(\.[0-9]{0,40})?|\.[0-9]{1,40})([eE][+-]?[0-9]{1,3})?$|^[+-]?(inf|nan)$"
)
_EXPRESSION_TOKEN = re.compile(
    r" *(?:(?P<number>[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<string>'[^'\\\n]*'|\"[^\"\\\n]*\")|(?P<op>\*\*|//|==|!=|<=|>=|[-+*/%(),=<>&|~]))"
)
_TRAILING_SPACE = re.compile(r" *\Z")
MAX_EXPRESSION_CHARS = 20_000
MAX_EXPRESSION_DEPTH = 64
MAX_INTEGER_DIGITS = 32
MAX_EXPONENT = 16
MAX_POWER_NESTING = 3  # (10**32) ** (16**3): a 130 kB integer at most


def check_sympy_expression(text: str) -> None:
    """Refuse (`_Unsafe`) a symbolic-shape expression unless it is within the grammar above."""
    if not isinstance(text, str) or len(text) > MAX_EXPRESSION_CHARS:
        raise _Unsafe("a symbolic expression is not a string or is too long")
    _ExpressionParser(text).parse()


class _ExpressionParser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens: list[tuple[str, str]] = []
        position = 0
        while position < len(text):
            if _TRAILING_SPACE.match(text, position):
                break
            match = _EXPRESSION_TOKEN.match(text, position)
            if match is None or match.end() == position:
                raise _Unsafe(f"symbolic expression {self._shown()} holds characters outside its grammar")
            kind = match.lastgroup or ""
            self.tokens.append((kind, match.group(kind)))
            position = match.end()
        self.index = 0
        self.depth = 0
        self.powers = 0

    def _shown(self) -> str:
        return repr(self.text[:120] + ("..." if len(self.text) > 120 else ""))

    def refuse(self, why: str) -> _Unsafe:
        return _Unsafe(f"symbolic expression {self._shown()} is refused: {why}")

    def peek(self) -> tuple[str, str]:
        return self.tokens[self.index] if self.index < len(self.tokens) else ("end", "")

    def take(self, value: str | None = None) -> tuple[str, str]:
        token = self.peek()
        if token[0] == "end" or (value is not None and token[1] != value):
            raise self.refuse(f"expected {value or 'more'} at token {self.index + 1}")
        self.index += 1
        return token

    def parse(self) -> None:
        self.comparison()
        if self.peek()[0] != "end":
            raise self.refuse(f"unexpected {self.peek()[1]!r}")

    # Each rule returns how deeply powers nest in what it parsed: sympy raises exact integers to them.

    def nest(self) -> None:
        self.depth += 1
        if self.depth > MAX_EXPRESSION_DEPTH:
            raise self.refuse(f"nested deeper than {MAX_EXPRESSION_DEPTH}")

    def powered(self, depth: int) -> int:
        if depth > MAX_POWER_NESTING:
            raise self.refuse(f"powers nested more than {MAX_POWER_NESTING} deep")
        return depth

    def comparison(self) -> int:
        depth = self.logic()
        while self.peek()[1] in ("<", "<=", ">", ">=", "==", "!="):
            self.take()
            depth = max(depth, self.logic())
        return depth

    def logic(self) -> int:
        depth = self.arith()
        while self.peek()[1] in ("&", "|"):
            self.take()
            depth = max(depth, self.arith())
        return depth

    def arith(self) -> int:
        depth = self.term()
        while self.peek()[1] in ("+", "-"):
            self.take()
            depth = max(depth, self.term())
        return depth

    def term(self) -> int:
        depth = self.unary()
        while self.peek()[1] in ("*", "/", "//", "%"):
            self.take()
            depth = max(depth, self.unary())
        return depth

    def unary(self) -> int:
        self.nest()
        if self.peek()[1] in ("-", "+", "~"):
            self.take()
            depth = self.unary()
        else:
            depth = self.power()
        self.depth -= 1
        return depth

    def power(self) -> int:
        depth = self.atom()
        if self.peek()[1] == "**":
            self.take()
            depth = self.powered(max(depth, self.exponent()) + 1)
        return depth

    def exponent(self) -> int:
        """The right side of `**` or the second argument of a Pow-like call: a literal at most
        MAX_EXPONENT, or an expression."""
        start = self.index
        depth = self.unary()
        tokens = self.tokens[start : self.index]
        if any(k == "name" and (v == "Symbol" or _SYMBOL_NAME.match(v)) for k, v in tokens):
            return depth  # symbolic: sympy keeps it unevaluated
        literal = _literal_value(tokens)
        if literal is None or abs(literal) > MAX_EXPONENT:
            raise self.refuse(f"a constant exponent must be a number of at most {MAX_EXPONENT}")
        return depth

    def atom(self) -> int:
        kind, value = self.take()
        if kind == "number":
            if len(value) > MAX_INTEGER_DIGITS + 2:
                raise self.refuse("a number has too many digits")
        elif kind == "name":
            if self.peek()[1] == "(":
                return self.call(value)
            if not (_SYMBOL_NAME.match(value) or value in _SYMPY_CONSTANTS):
                raise self.refuse(f"the name {value!r} is not a size symbol or a known constant")
        elif value == "(":
            self.nest()
            depth = self.comparison()
            self.take(")")
            self.depth -= 1
            return depth
        else:
            raise self.refuse(f"unexpected {value!r}")
        return 0

    def call(self, function: str) -> int:
        if function not in _SYMPY_FUNCTIONS:
            raise self.refuse(f"{function!r} is not a function torch.export writes")
        self.nest()
        self.take("(")
        depth = position = 0
        while self.peek()[1] != ")":
            if position:
                self.take(",")
            depth = max(depth, self.argument(function, position))
            position += 1
        self.take(")")
        self.depth -= 1
        return self.powered(depth + 1) if function in _POWER_FUNCTIONS else depth

    def argument(self, function: str, position: int) -> int:
        kind, value = self.peek()
        following = self.tokens[self.index + 1] if self.index + 1 < len(self.tokens) else ("end", "")
        if kind == "name" and following[1] == "=":  # keyword argument: positive=True, precision=53
            self.index += 2
            kind, value = self.take()
            if value == "-":
                kind, value = self.take()
            if not (value in ("True", "False") or (kind == "number" and value.isdigit() and len(value) < 6)):
                raise self.refuse(f"keyword value {value!r}")
            return 0
        if kind == "string":
            self.index += 1
            inner = value[1:-1]
            if function == "Symbol" and position == 0 and _QUOTED_SYMBOL.match(inner):
                return 0
            if function == "Float" and position == 0 and _FLOAT_DIGITS.match(inner):
                return 0
            raise self.refuse(f"the string {value[:40]!r} in {function}(...)")
        if function in _POWER_FUNCTIONS and position == 1:
            return self.exponent()
        return self.comparison()


def _literal_value(tokens: list[tuple[str, str]]) -> float | None:
    """The largest magnitude in an exponent that is one literal (`2`, `-3`, `Integer(4)`,
    `Rational(1, 2)`, `Float('0.5', precision=53)`), or None when it is anything else."""
    names = {v for k, v in tokens if k == "name"}
    if len(names - {"precision"}) > 1 or not names <= {"Integer", "Rational", "Float", "precision"}:
        return None
    if any(k == "op" and v not in ("(", ")", ",", "-", "=") for k, v in tokens):
        return None
    values: list[float] = []
    for index, (kind, value) in enumerate(tokens):
        if index and tokens[index - 1][1] == "=":
            continue  # precision=53
        if kind in ("number", "string"):
            try:
                values.append(abs(float(value.strip("'\""))))
            except ValueError:
                return None
    if not values or not all(math.isfinite(v) for v in values):
        return None
    return max(values)


# --------------------------------------------------------------------------------------------------
# Loading (probe subprocess only)


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
    _, program_json = _inspect(path, DEFAULT_MAX_UNCOMPRESSED_BYTES)  # the bytes checked are the bytes read
    try:
        from torch._export.serde import schema
        from torch._export.serde.serialize import ExportedProgramDeserializer, _bytes_to_dataclass
        from torch.export.pt2_archive._package import PT2ArchiveReader, _load_constants, _load_state_dict
    except ImportError as exc:  # the loader's internals moved in this torch version
        raise ArchiveError(
            "unsupported_torch", f"torch {torch.__version__} cannot load export archives here: {exc}"
        ) from exc
    with _refuse_unpickling():
        reader = PT2ArchiveReader(str(path))
        serialized = _bytes_to_dataclass(schema.ExportedProgram, program_json)
        state_dict = _load_state_dict(reader, MODEL_NAME)
        constants = _load_constants(reader, MODEL_NAME)
        # b"": no sample inputs. torch would torch.load them, falling back to weights_only=False.
        return ExportedProgramDeserializer().deserialize(serialized, state_dict, constants, b"")


def _fresh_module(program: torch.export.ExportedProgram) -> nn.Module:
    """A trainable GraphModule with its own copy of the weights (`program.module()` shares them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deepcopy of pytree specs: a torch-internal notice
        return copy.deepcopy(program.module())


def describe_program(program: torch.export.ExportedProgram) -> dict[str, Any]:
    """The program's user inputs (per-sample shape, None where dynamic; dtype) and batch range."""
    placeholders = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    inputs = []
    batch: dict[str, Any] = {"dynamic": True, "min": None, "max": None}
    for name in program.graph_signature.user_inputs:
        value = placeholders[name].meta.get("val") if name in placeholders else None
        if not isinstance(value, torch.Tensor) or value.ndim == 0:
            raise ArchiveError(
                "unsupported_inputs", f"input {name!r} of the exported program is not a batched tensor"
            )
        dims = [d if isinstance(d, int) else None for d in value.shape]
        inputs.append({"name": name, "shape": dims[1:], "dtype": str(value.dtype).removeprefix("torch.")})
        first = value.shape[0]
        if isinstance(first, int):
            batch = {"dynamic": False, "size": first}
        elif batch["dynamic"]:
            bounds = program.range_constraints.get(first.node.expr)
            if bounds is not None:
                lower, upper = bounds.lower, bounds.upper
                batch["min"] = int(lower) if _finite(lower) else None
                batch["max"] = int(upper) if _finite(upper) else None
    return {"inputs": inputs, "batch": batch}


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------------------------------
# The training task: what the probe feeds the program and how it computes the loss


@dataclass(frozen=True)
class ExportedConfig:
    """How to train an exported program (stored as the recommendation's `model.config`)."""

    loss: str
    input_shape: tuple[int, ...]
    input_dtype: str = "float32"
    input_high: int | None = None  # exclusive bound of integer inputs (token ids)
    target_shape: tuple[int, ...] = ()
    target_dtype: str = "int64"
    target_high: int | None = None  # classes of integer targets
    max_batch_size: int | None = None  # upper bound of the exported batch dimension, when it has one
    device: str = "cpu"  # where the probe trains it (set by the probe, not part of the artifact)

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", tuple(self.input_shape))
        object.__setattr__(self, "target_shape", tuple(self.target_shape))
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {list(LOSSES)}, got {self.loss!r}")
        for name in ("input_dtype", "target_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name} must be one of {list(DTYPES)}, got {getattr(self, name)!r}")
        if any(not isinstance(d, int) or d <= 0 for d in self.input_shape + self.target_shape):
            raise ValueError("shapes must be lists of positive integers")
        if _is_integer(self.input_dtype) and self.input_dtype != "bool" and not self.input_high:
            raise ValueError("integer inputs need input_high (the exclusive bound of their values)")
        if _is_integer(self.target_dtype) and self.target_dtype != "bool" and not self.target_high:
            raise ValueError("integer targets need target_high (the number of classes)")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExportedConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown fields {unknown}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("device")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @property
    def num_classes(self) -> int:
        return int(self.target_high or 0) if _is_integer(self.target_dtype) else 0


def _is_integer(dtype: str) -> bool:
    return dtype.startswith(("int", "uint")) or dtype == "bool"


def _synthesise(
    shape: tuple[int, ...],
    dtype: str,
    high: int | None,
    batch_size: int,
    device: torch.device | str,
    generator: torch.Generator | None,
) -> torch.Tensor:
    full = (batch_size, *shape)
    if dtype == "bool":
        return randint(2, full, device, generator).bool()
    if _is_integer(dtype):
        return randint(int(high or 1), full, device, generator).to(getattr(torch, dtype))
    return randn(full, device, generator).to(getattr(torch, dtype))


class _DeferredLoss:
    """What `forward(x)` returns for a model that computes its own loss from `(x, target)`."""

    def __init__(self, program: nn.Module, inputs: torch.Tensor) -> None:
        self.program = program
        self.inputs = inputs

    def __call__(self, targets: torch.Tensor) -> Any:
        return self.program(self.inputs, targets)


class ExportedModule(nn.Module):
    """The program's GraphModule behind the zoo's `model(inputs)` convention.

    `train()`/`eval()` only set the flag: the graph was captured in train mode and GraphModule refuses
    them. With `model_returns_loss`, `forward(x)` defers the call until the loss sees the targets.
    """

    def __init__(self, program: nn.Module, returns_loss: bool) -> None:
        super().__init__()
        self.program = program
        self.returns_loss = returns_loss

    def train(self, mode: bool = True) -> ExportedModule:
        self.training = mode
        return self

    def forward(self, inputs: torch.Tensor) -> Any:
        if self.returns_loss:
            return _DeferredLoss(self.program, inputs)
        return self.program(inputs)


def _scalar(value: Any) -> torch.Tensor:
    if isinstance(value, dict):
        value = value.get("loss", next(iter(value.values()), None))
    elif isinstance(value, list | tuple):
        value = value[0] if value else None
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"the loss must be a scalar tensor, got {shape}")
    return value.reshape(())


def _loss_cross_entropy(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    if not isinstance(outputs, torch.Tensor):
        raise ValueError(f"loss cross_entropy needs the model to return logits, got {type(outputs).__name__}")
    return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))


def _loss_mse(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    if not isinstance(outputs, torch.Tensor):
        raise ValueError(f"loss mse needs the model to return a tensor, got {type(outputs).__name__}")
    return F.mse_loss(outputs.float(), targets.float())


def _loss_l1(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    if not isinstance(outputs, torch.Tensor):
        raise ValueError(f"loss l1 needs the model to return a tensor, got {type(outputs).__name__}")
    return F.l1_loss(outputs.float(), targets.float())


def _loss_huber(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    if not isinstance(outputs, torch.Tensor):
        raise ValueError(f"loss huber needs the model to return a tensor, got {type(outputs).__name__}")
    return F.huber_loss(outputs.float(), targets.float())  # delta 1.0


def _loss_returned(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    return _scalar(outputs(targets) if isinstance(outputs, _DeferredLoss) else outputs)


_LOSS_FUNCTIONS = {
    "cross_entropy": _loss_cross_entropy,
    "mse": _loss_mse,
    "l1": _loss_l1,
    "huber": _loss_huber,
    "model_returns_loss": _loss_returned,
}


def model_spec_for(path: str, config: ExportedConfig, *, label: str | None = None) -> ModelSpec:
    """A ModelSpec whose `build` returns a fresh copy of the archive's program (its own weights)."""

    def build(cfg: ExportedConfig, gradient_checkpointing: bool) -> nn.Module:
        if gradient_checkpointing:
            raise ValueError("uploaded models do not support gradient checkpointing")
        program = load_program(str(path))
        if cfg.device != "cpu":
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, cfg.device)
        return ExportedModule(_fresh_module(program), cfg.loss == "model_returns_loss")

    def make_batch(
        cfg: ExportedConfig, batch_size: int, device: torch.device | str, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = _synthesise(cfg.input_shape, cfg.input_dtype, cfg.input_high, batch_size, device, generator)
        targets = _synthesise(
            cfg.target_shape, cfg.target_dtype, cfg.target_high, batch_size, device, generator
        )
        return inputs, targets

    return ModelSpec(
        name=label or f"uploaded model {Path(path).name}",
        description="A torch.export program uploaded by a client.",
        config_type=ExportedConfig,
        build=build,
        make_batch=make_batch,
        loss=_LOSS_FUNCTIONS[config.loss],
        input_shape=lambda cfg: list(cfg.input_shape),
        input_dtype=config.input_dtype,
        num_classes=lambda cfg: cfg.num_classes,
        supports_gradient_checkpointing=False,
    )


def resolve_exported(spec: ProbeSpec) -> tuple[ModelSpec, ExportedConfig]:
    """The probe engine's `_resolve_model` for a spec with `model_artifact_path`."""
    path = str(spec.model_artifact_path)
    try:
        config = ExportedConfig.from_dict({**spec.model_config, "device": spec.device})
    except (TypeError, ValueError) as exc:
        raise ProbeError("invalid_config", f"invalid config for the uploaded model: {exc}") from exc
    try:
        load_program(path)
    except ArchiveError as exc:
        raise ProbeError("invalid_artifact", exc.message) from exc
    except Exception as exc:
        raise ProbeError(
            "model_error", f"loading the uploaded model failed: {type(exc).__name__}: {exc}"
        ) from exc
    return model_spec_for(path, config, label=spec.model_name), config


# --------------------------------------------------------------------------------------------------
# The dry run: infer the training task, then train at batch sizes 2, 3 and 1


def _declared_tensor(declared: dict[str, Any], key: str) -> dict[str, Any]:
    value = declared.get(key) or {}
    if not isinstance(value, dict):
        raise ArchiveError("invalid_model_spec", f"{key} must be an object with shape, dtype and high")
    return value


def _resolve_tensor(
    name: str, program_input: dict[str, Any], declared: dict[str, Any]
) -> tuple[tuple[int, ...], str, int | None]:
    """Per-sample shape and dtype from the program, checked against (or completed by) the declaration."""
    dims: list[int | None] = program_input["shape"]
    dtype = program_input["dtype"]
    shape = declared.get("shape")
    if shape is not None:
        if not isinstance(shape, list) or any(not isinstance(d, int) or d <= 0 for d in shape):
            raise ArchiveError("invalid_model_spec", f"{name}.shape must be a list of positive integers")
        if len(shape) != len(dims) or any(d is not None and d != s for d, s in zip(dims, shape, strict=True)):
            shown = ["dynamic" if d is None else d for d in dims]
            raise ArchiveError(
                "input_shape_mismatch",
                f"{name}.shape {shape} does not match the exported program, whose per-sample {name} is "
                f"{shown}",
            )
    elif any(d is None for d in dims):
        raise ArchiveError(
            "invalid_model_spec",
            f"{name}.shape is required: the exported program's per-sample {name} has dynamic dimensions "
            f"{['dynamic' if d is None else d for d in dims]}",
        )
    else:
        shape = dims
    if declared.get("dtype") not in (None, dtype):
        raise ArchiveError(
            "invalid_model_spec",
            f"{name}.dtype {declared['dtype']!r} does not match the exported program's {dtype!r}",
        )
    if dtype not in DTYPES:
        raise ArchiveError("invalid_model_spec", f"{name} dtype {dtype!r} is not supported")
    high = declared.get("high")
    if high is not None and (not isinstance(high, int) or isinstance(high, bool) or high <= 0):
        raise ArchiveError("invalid_model_spec", f"{name}.high must be a positive integer")
    return tuple(shape), dtype, high


def infer_config(program: torch.export.ExportedProgram, declared: dict[str, Any]) -> ExportedConfig:
    """The ExportedConfig for this program and the client's declaration (loss, input, target, num_classes)."""
    loss = declared.get("loss")
    if loss not in LOSSES:
        raise ArchiveError("invalid_model_spec", f"loss must be one of {list(LOSSES)}, got {loss!r}")
    num_classes = declared.get("num_classes")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes <= 0):
        raise ArchiveError("invalid_model_spec", "num_classes must be a positive integer")
    described = describe_program(program)
    batch = described["batch"]
    if not batch["dynamic"]:
        raise _static(batch["size"])
    if batch["max"] is not None and batch["max"] < 3:
        raise ArchiveError(
            "static_batch_dimension",
            f"the batch dimension is limited to at most {batch['max']}; export it with "
            "dynamic_shapes={'x': {0: torch.export.Dim('batch')}} and no small max",
        )
    expected = 2 if loss == "model_returns_loss" else 1
    inputs = described["inputs"]
    if len(inputs) != expected:
        signature = "forward(x, target)" if expected == 2 else "forward(x)"
        raise ArchiveError(
            "unsupported_inputs",
            f"loss {loss} expects {signature}, but the exported program takes {len(inputs)} inputs "
            f"({', '.join(i['name'] for i in inputs)})",
        )
    shape, dtype, high = _resolve_tensor("input", inputs[0], _declared_tensor(declared, "input"))
    if _is_integer(dtype) and dtype != "bool" and high is None:
        high = num_classes
        if high is None and loss != "cross_entropy":
            raise ArchiveError(
                "invalid_model_spec",
                "input.high is required for integer inputs: the exclusive bound of their values "
                "(e.g. the vocabulary size)",
            )
    base = {"loss": loss, "input_shape": shape, "input_dtype": dtype, "max_batch_size": batch["max"]}
    if loss == "model_returns_loss":
        t_shape, t_dtype, t_high = _resolve_tensor("target", inputs[1], _declared_tensor(declared, "target"))
        t_high = t_high or num_classes
        if _is_integer(t_dtype) and t_dtype != "bool" and t_high is None:
            raise ArchiveError(
                "invalid_model_spec", "target.high (or num_classes) is required for integer targets"
            )
        return _config(
            {
                **base,
                "input_high": high,
                "target_shape": t_shape,
                "target_dtype": t_dtype,
                "target_high": t_high,
            }
        )
    # Run the model once to see its output: the targets are shaped after it.
    probe_input = high or num_classes or 2
    module = ExportedModule(_fresh_module(program), False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x = _synthesise(shape, dtype, probe_input, 2, "cpu", generator)
        try:
            out = module(x)
        except Exception as exc:
            raise _step_failed(2, exc) from exc
    if not isinstance(out, torch.Tensor) or out.ndim == 0 or out.shape[0] != 2:
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ArchiveError(
            "unsupported_outputs",
            f"loss {loss} needs forward(x) to return one tensor with the batch first, got {got} at batch "
            "size 2 (a model that computes its own loss: loss=model_returns_loss)",
        )
    per_sample = tuple(int(d) for d in out.shape[1:])
    if loss in REGRESSION_LOSSES:
        return _config({**base, "input_high": high, "target_shape": per_sample, "target_dtype": "float32"})
    if not per_sample or not out.is_floating_point():
        raise ArchiveError(
            "unsupported_outputs",
            f"loss cross_entropy needs float logits [batch, ..., classes], got {list(out.shape)} {out.dtype}",
        )
    classes = per_sample[-1]
    if num_classes is not None and num_classes != classes:
        raise ArchiveError(
            "invalid_model_spec",
            f"num_classes is {num_classes} but the model's logits have {classes} classes (last dimension)",
        )
    if _is_integer(dtype) and dtype != "bool" and high is None:
        high = classes
    return _config(
        {
            **base,
            "input_high": high,
            "target_shape": per_sample[:-1],
            "target_dtype": "int64",
            "target_high": classes,
        }
    )


def _config(values: dict[str, Any]) -> ExportedConfig:
    try:
        return ExportedConfig(**values)
    except ValueError as exc:
        raise ArchiveError("invalid_model_spec", str(exc)) from exc


def _static(size: int) -> ArchiveError:
    return ArchiveError(
        "static_batch_dimension",
        f"the batch dimension is static: the program was exported for batch size {size} only. Export "
        "with dynamic_shapes={'x': {0: torch.export.Dim('batch')}} so the probe can vary it",
    )


def _step_failed(batch_size: int, exc: BaseException) -> ArchiveError:
    text = f"{type(exc).__name__}: {exc}".strip()
    if len(text) > 800:
        text = text[:800] + " ..."
    return ArchiveError("dry_run_failed", f"a training step at batch size {batch_size} failed: {text}")


def dry_run(path: str, declared: dict[str, Any]) -> dict[str, Any]:
    """Load the archive, infer its training task, and run real training steps at batch sizes 2, 3, 1.

    Returns {"config", "parameters", "parameter_bytes", "trainable_parameter_bytes", "losses",
    "inputs", "batch"}; raises ArchiveError with a client-facing message on any problem.
    """
    from service.probing.step import TrainingStep

    try:
        program = load_program(path)
    except ArchiveError:
        raise
    except Exception as exc:
        raise ArchiveError(
            "not_an_export_archive", f"the archive cannot be loaded as a torch.export program: {exc}"
        ) from exc
    config = infer_config(program, declared)
    spec = model_spec_for(path, config)
    try:
        step = TrainingStep(spec, config, optimizer="sgd", learning_rate=1e-3, device="cpu", seed=0)
    except ProbeError as exc:
        raise ArchiveError("dry_run_failed", exc.message) from exc
    losses: dict[str, float] = {}
    for batch_size in DRY_RUN_BATCH_SIZES:
        try:
            loss = float(step.run(batch_size))
        except Exception as exc:
            step.discard_gradients()
            text = str(exc)
            if batch_size == 3 and ("[0]" in text or "shape[0]" in text or "size()[0]" in text):
                raise ArchiveError(
                    "static_batch_dimension",
                    f"the batch dimension is static: batch size 2 trains but 3 fails ({type(exc).__name__}: "
                    f"{text[:300]}). Export with dynamic_shapes={{'x': {{0: torch.export.Dim('batch')}}}}",
                ) from exc
            raise _step_failed(batch_size, exc) from exc
        if not math.isfinite(loss):
            raise ArchiveError(
                "dry_run_failed", f"the loss is {loss} at a training step at batch size {batch_size}"
            )
        losses[str(batch_size)] = loss
    model = step.model
    described = describe_program(program)
    return {
        "config": config.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "parameter_bytes": step.state_bytes_estimate["parameters"],
        "trainable_parameter_bytes": step.state_bytes_estimate["gradients"],
        "losses": losses,
        "inputs": described["inputs"],
        "batch": described["batch"],
        "torch": torch.__version__,
    }


# --------------------------------------------------------------------------------------------------
# Entry point: python -m service.probing.exported


def _protocol_stream() -> IO[str]:
    """The real stdout becomes a private protocol descriptor; fd 1 goes to stderr (as in runner.py)."""
    sys.stdout.flush()
    protocol_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    return os.fdopen(protocol_fd, "w", buffering=1, encoding="utf-8")


def main() -> int:
    protocol = _protocol_stream()

    def emit(message: dict[str, Any]) -> None:
        protocol.write(json.dumps(message, default=str) + "\n")
        protocol.flush()

    try:
        request = json.loads(sys.stdin.read())
        result = dry_run(str(request["path"]), dict(request.get("declared") or {}))
        emit({"event": "result", "result": result})
    except ArchiveError as exc:
        emit({"event": "error", "code": exc.code, "message": exc.message})
    except Exception as exc:
        traceback.print_exc()
        emit({"event": "error", "code": "dry_run_failed", "message": f"{type(exc).__name__}: {exc}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
