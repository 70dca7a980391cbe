"""Inspection of an uploaded `torch.export` archive (`.pt2`): `zipfile` and `json` only, no torch.

The service process calls `inspect_archive` before anything else touches an upload, so this module
imports neither torch nor the rest of this package (a test checks it).

Safety. `torch.export.load` unpickles weights and constants marked `"use_pickle": true`, pickled
Python/TorchScript objects among the constants, legacy `*.pt` payloads, and the archive's sample
inputs (with a `weights_only=False` fallback). So:

- `inspect_archive` reads the zip with `zipfile` and `json` only (bounded: `service.probing.untrusted`)
  and refuses every one of those.
- The deserializer also *evaluates* text from the program's JSON: symbolic-shape expressions go to
  `sympy.sympify` (Python `eval`), node targets are looked up on `torch` and called, names become
  generated Python source, tree specs can import modules. `check_program_json` (part of the
  inspection) refuses the archive (`unsafe_archive_content`, naming the member) unless every string
  is inert: expressions within the grammar `sympy.srepr` writes, targets among the operators
  torch.export emits, names plain tokens.
- The loader (`service.probing.exported.loader`, probe subprocess only) re-inspects with
  `read_checked_program` and rebuilds the program from exactly the bytes checked here.
"""

from __future__ import annotations

import math
import os
import re
import zipfile
from typing import Any

from service.probing import guard_code, untrusted

MODEL_NAME = "model"  # torch.export.save stores its one program under this name
DEFAULT_MAX_UNCOMPRESSED_BYTES = 1024**3
MAX_ENTRIES = 20_000  # one file per weight: far more than any real model has
MAX_CONFIG_BYTES = 32 * 1024**2  # models/model.json and the weights/constants configs, each
MAX_JSON_DEPTH = 64  # torch.export's JSON nests ~10 levels, more with nested subgraphs

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


def read_checked_program(path: str | os.PathLike[str]) -> bytes:
    """The bytes of models/model.json after the full inspection: the loader deserializes these bytes,
    so what was checked is what is read. Raises ArchiveError as `inspect_archive` does."""
    return _inspect(path, DEFAULT_MAX_UNCOMPRESSED_BYTES)[1]


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
