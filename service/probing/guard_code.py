"""The shape guards an exported program carries (`guards_code`), checked before torch compiles them.

torch.export stores each guard as Python source, e.g. `(6*L['tokens'].size()[0]) == (6*L['targets']
.size()[0])`, and the loader pastes them into a function it `exec`s. A guard from an uploaded archive is
therefore accepted only when its syntax tree uses nothing but what those guards are made of: the
inputs `L['name']...`, their `size()`/`stride()`/`storage_offset()`/`dim()`, integer constants,
arithmetic, comparisons, boolean logic and the symbolic helpers torch's printer writes (Max, Min, ...).
Standard library only.
"""

from __future__ import annotations

import ast
import re

MAX_GUARD_CHARS = 4096
_NAME_KEY = re.compile(r"^[A-Za-z0-9_.]{1,256}$")
_TENSOR_METHODS = frozenset({"size", "stride", "storage_offset", "dim", "numel"})
_FUNCTIONS = frozenset({"Max", "Min", "FloorDiv", "Mod", "PythonMod", "CeilToInt", "FloorToInt", "Abs"})
_OPERATORS = (
    ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod, ast.Pow, ast.USub, ast.UAdd, ast.Not, ast.And,
    ast.Or, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE,
)  # fmt: skip


def check_guard_code(text: str) -> None:
    """Raise ValueError unless `text` is a shape guard of the form torch.export writes."""
    if not isinstance(text, str) or len(text) > MAX_GUARD_CHARS:
        raise ValueError("a guard is not a string or is too long")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ValueError(f"guard {text[:80]!r} is not an expression") from None
    _check_node(tree.body, text)


def _check_node(node: ast.AST, text: str) -> None:
    if isinstance(node, ast.Constant):
        if type(node.value) is not int and type(node.value) is not bool:
            raise ValueError(f"guard {text[:80]!r} has a constant that is not an integer")
        return
    if isinstance(node, ast.BinOp | ast.UnaryOp | ast.BoolOp | ast.Compare):
        operators = {
            ast.BinOp: lambda n: [n.op],
            ast.UnaryOp: lambda n: [n.op],
            ast.BoolOp: lambda n: [n.op],
            ast.Compare: lambda n: n.ops,
        }[type(node)](node)
        if not all(isinstance(op, _OPERATORS) for op in operators):
            raise ValueError(f"guard {text[:80]!r} uses an operator shape guards do not use")
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, ast.operator | ast.unaryop | ast.boolop | ast.cmpop):
                _check_node(child, text)
        return
    if isinstance(node, ast.Subscript) and _is_input(node):
        return
    if isinstance(node, ast.Subscript):  # L['x'].size()[0]
        if not (isinstance(node.slice, ast.Constant) and type(node.slice.value) is int):
            raise ValueError(f"guard {text[:80]!r} indexes with something other than an integer")
        _check_node(node.value, text)
        return
    if isinstance(node, ast.Call) and not node.keywords:
        function = node.func
        if (
            isinstance(function, ast.Attribute)
            and function.attr in _TENSOR_METHODS
            and not node.args
            and isinstance(function.value, ast.Subscript)
            and _is_input(function.value)
        ):
            return
        if isinstance(function, ast.Name) and function.id in _FUNCTIONS:
            for argument in node.args:
                _check_node(argument, text)
            return
    raise ValueError(f"guard {text[:80]!r} holds {type(node).__name__}, which shape guards do not")


def _is_input(node: ast.Subscript) -> bool:
    """`L['name']` (possibly nested, `L['x']['k']` or `L['x'][0]`): an input of the exported program."""
    value: ast.AST = node
    while isinstance(value, ast.Subscript):
        key = value.slice
        if not isinstance(key, ast.Constant):
            return False
        if not (type(key.value) is int or (isinstance(key.value, str) and _NAME_KEY.match(key.value))):
            return False
        value = value.value
    return isinstance(value, ast.Name) and value.id == "L"
