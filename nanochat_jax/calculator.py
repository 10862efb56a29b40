"""The calculator tool: a small sandboxed evaluator for the expressions a model writes between
<|python_start|> and <|python_end|>.

`calculate(expression) -> str` parses with `ast` and walks the tree itself; nothing is ever handed
to eval/exec/compile. It understands numbers (int, float, bool), + - * / // % ** and unary +/-,
comparisons, string literals, string indexing/slicing, a few string methods ('strawberry'.count('r'),
.lower(), .upper(), ...) and a few builtins (len, abs, round, min, max, int, float, str). Everything
else -- names, attributes, imports, lambdas, comprehensions, f-strings, keyword arguments -- is
refused. Sizes are checked BEFORE work is done (input length, tree depth and size, integer bits,
string lengths), so every call returns quickly. Failures return a short text starting with "Error:".
"""

from __future__ import annotations

import ast
import math
import operator
import re
import warnings

MAX_INPUT_CHARS = 1000
MAX_DEPTH = 100  # of the syntax tree
MAX_NODES = 256
MAX_INT_BITS = 4096  # ~1233 decimal digits
MAX_STR_LEN = 10_000
MAX_RESULT_CHARS = 500
PURE_MATH_CHARS = set("0123456789.+-*/%() ,")
THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")  # the comma in 1,234 (not in 3,5 or 1,2)


class CalcError(Exception):
    """A refused or failed expression; the message is shown to the model after 'Error: '."""


def calculate(expression: str) -> str:
    """Evaluate one expression; return the result as Python would print it, or 'Error: ...'."""
    try:
        return _format(_evaluate(expression))
    except CalcError as e:
        return f"Error: {e}"
    except ZeroDivisionError:
        return "Error: division by zero"
    except (OverflowError, MemoryError):
        return "Error: number too large"
    except RecursionError:
        return "Error: expression too deeply nested"
    except (TypeError, ValueError, IndexError) as e:
        return f"Error: {type(e).__name__}: {str(e)[:80]}"


def _evaluate(expression: str):
    if not isinstance(expression, str):
        raise CalcError("expression must be a string")
    if len(expression) > MAX_INPUT_CHARS:
        raise CalcError(f"expression longer than {MAX_INPUT_CHARS} characters")
    expression = expression.strip()
    if set(expression) <= PURE_MATH_CHARS:
        expression = THOUSANDS_COMMA.sub("", expression)  # "1,234 * 5"; any other comma stays and is refused
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(expression, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise CalcError(f"invalid syntax ({type(e).__name__})") from None
    _check_size(tree)
    return _eval(tree.body)


def _check_size(tree: ast.AST) -> None:
    """Iterative walk: refuse trees that are too deep or too big before evaluating anything."""
    stack, count = [(tree, 1)], 0
    while stack:
        node, depth = stack.pop()
        count += 1
        if depth > MAX_DEPTH:
            raise CalcError("expression too deeply nested")
        if count > MAX_NODES:
            raise CalcError("expression too long")
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))


def _format(value) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CalcError("result is not a finite number")
        value = float(f"{value:.12g}")  # 0.1+0.2 -> 0.3; keeps 12 significant digits
    text = str(value)
    if len(text) > MAX_RESULT_CHARS:
        raise CalcError(f"result longer than {MAX_RESULT_CHARS} characters")
    return text


# ---------------------------------------------------------------------------------------------
# The tree walker. Values are only ever int, float, bool or str.

BIN_OPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
COMPARE_OPS = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge,
}
STR_METHODS = {
    "count": str.count, "find": str.find, "lower": str.lower, "upper": str.upper, "strip": str.strip,
    "startswith": str.startswith, "endswith": str.endswith, "replace": str.replace,
}


def _to_str(x) -> str:
    if isinstance(x, float):
        return _format(x)
    return str(x)


FUNCTIONS = {"len": len, "abs": abs, "round": round, "min": min, "max": max, "int": int, "float": float, "str": _to_str}


def _eval(node: ast.AST):
    if isinstance(node, ast.Constant):
        if type(node.value) in (int, float, bool, str):
            return _checked(node.value)
        raise CalcError(f"unsupported literal {type(node.value).__name__}")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        x = _number(_eval(node.operand))
        return -x if isinstance(node.op, ast.USub) else +x
    if isinstance(node, ast.BinOp) and type(node.op) in BIN_OPS:
        a, b = _eval(node.left), _eval(node.right)
        _precheck(node.op, a, b)
        return _checked(BIN_OPS[type(node.op)](a, b))
    if isinstance(node, ast.Compare) and all(type(op) in COMPARE_OPS for op in node.ops):
        left = _eval(node.left)
        for op, right_node in zip(node.ops, node.comparators):
            right = _eval(right_node)
            if not COMPARE_OPS[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.Subscript):
        return _subscript(node)
    if isinstance(node, ast.Call):
        return _call(node)
    raise CalcError(f"{type(node).__name__} is not allowed")


def _number(x):
    if type(x) not in (int, float, bool):
        raise CalcError("unary +/- needs a number")
    return x


def _checked(x):
    """Every value produced passes through here: bounded ints/strings, no complex numbers."""
    if isinstance(x, bool):
        return x
    if isinstance(x, int):
        if x.bit_length() > MAX_INT_BITS:
            raise CalcError("number too large")
        return x
    if isinstance(x, float):
        return x
    if isinstance(x, str):
        if len(x) > MAX_STR_LEN:
            raise CalcError(f"string longer than {MAX_STR_LEN} characters")
        return x
    raise CalcError(f"result of type {type(x).__name__} is not allowed")


def _precheck(op: ast.operator, a, b) -> None:
    """Refuse operations whose result would be too big, before computing them."""
    if isinstance(op, ast.Mod) and isinstance(a, str):  # '%0999999999d' % 1 would build the whole string first
        raise CalcError("string formatting with % is not supported")
    if isinstance(op, ast.Mult):
        if isinstance(a, str) or isinstance(b, str):
            s, n = (a, b) if isinstance(a, str) else (b, a)
            if isinstance(n, int) and len(s) * max(n, 0) > MAX_STR_LEN:
                raise CalcError(f"string longer than {MAX_STR_LEN} characters")
        elif isinstance(a, int) and isinstance(b, int) and a.bit_length() + b.bit_length() > MAX_INT_BITS + 1:
            raise CalcError("number too large")
    if isinstance(op, ast.Pow) and isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1:
        if b * math.log2(abs(a)) > MAX_INT_BITS:
            raise CalcError("number too large")


def _index(x):
    if x is None:
        return None
    if type(x) is not int:
        raise CalcError("string indices must be integers")
    return x


def _subscript(node: ast.Subscript):
    target = _eval(node.value)
    if not isinstance(target, str):
        raise CalcError("only strings can be indexed")
    sl = node.slice
    if isinstance(sl, ast.Slice):
        parts = [_index(_eval(p)) if p is not None else None for p in (sl.lower, sl.upper, sl.step)]
        return target[slice(*parts)]
    return target[_index(_eval(sl))]


def _call(node: ast.Call):
    if node.keywords:
        raise CalcError("keyword arguments are not allowed")
    if any(isinstance(a, ast.Starred) for a in node.args):
        raise CalcError("*args are not allowed")
    func = node.func
    if isinstance(func, ast.Name):
        if func.id not in FUNCTIONS:
            raise CalcError(f"unknown function {func.id[:20]!r}")
        args = [_eval(a) for a in node.args]
        if func.id == "round" and len(args) == 2 and isinstance(args[1], int) and abs(args[1]) > 100:
            raise CalcError("round() digits must be within [-100, 100]")
        return _checked(FUNCTIONS[func.id](*args))
    if isinstance(func, ast.Attribute):
        if func.attr not in STR_METHODS:
            raise CalcError(f"unknown method {func.attr[:20]!r}")
        receiver = _eval(func.value)
        if type(receiver) is not str:
            raise CalcError(f".{func.attr}() works on strings only")
        args = [_eval(a) for a in node.args]
        if not all(type(a) in (str, int) for a in args):
            raise CalcError(f".{func.attr}() takes strings or integers")
        if func.attr == "replace" and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
            growth = max(len(args[1]) - len(args[0]), 0) * (len(receiver) + 1)
            if len(receiver) + growth > MAX_STR_LEN:
                raise CalcError(f"string longer than {MAX_STR_LEN} characters")
        return _checked(STR_METHODS[func.attr](receiver, *args))
    raise CalcError("only simple function calls are allowed")
