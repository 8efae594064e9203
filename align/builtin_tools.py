"""The built-in tools: a calculator and a Python interpreter.

Both run inside `align.sandbox`'s worker processes under its guard (no network, no processes, files
only in the worker's scratch directory, a memory limit and a deadline). This module imports nothing
heavy: the workers import it to run the tools.
"""
from __future__ import annotations

import ast
import contextlib
import io
import operator

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
        ast.USub: operator.neg, ast.UAdd: operator.pos}
_MAX_EXPONENT = 1000  # 9 ** 9 ** 9 would hold the worker until its deadline; refuse it at once


def _eval(node: ast.AST) -> float | int:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
            raise ValueError(f"exponent {right} is too large")
        return _OPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.operand))
    raise ValueError(f"not arithmetic: {ast.unparse(node)!r}")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression with + - * / // % ** and parentheses.

    Args:
        expression: the expression to evaluate, e.g. "23 * 47 + 5"
    """
    value = _eval(ast.parse(expression.replace("^", "**").replace("×", "*"), mode="eval"))
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def python(code: str) -> str:
    """Run Python code and return what it prints (and the value of a final expression).

    Args:
        code: Python source; no network, and files only in the working directory
    """
    tree = ast.parse(code, mode="exec")
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    scope: dict = {"__name__": "__tool__"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(tree, "<tool>", "exec"), scope)  # noqa: S102 - the point of the tool, run under the guard
        if last is not None:
            value = eval(compile(ast.Expression(last.value), "<tool>", "eval"), scope)  # noqa: S307
            if value is not None:
                print(repr(value))
    return out.getvalue()
