"""The calculator sandbox: hostile inputs are refused quickly; legitimate arithmetic and spelling work."""

import time

import pytest

from nanochat_jax.calculator import MAX_INPUT_CHARS, calculate

HOSTILE = [
    # imports and dangerous builtins
    "__import__('os').system('ls')",
    "import os",
    "from os import system",
    "exec('1')",
    "eval('1+1')",
    "compile('1','','eval')",
    "open('/etc/passwd').read()",
    "globals()",
    "locals()",
    "vars()",
    "dir()",
    "breakpoint()",
    "input()",
    "getattr('a', 'upper')()",
    "setattr(1, 'x', 2)",
    "type(1)",
    "help()",
    "exit()",
    "__builtins__",
    "os",
    "x",
    # dunder access and attribute walks
    "().__class__.__bases__[0].__subclasses__()",
    "''.__class__.__mro__[1].__subclasses__()",
    "'a'.__class__",
    "(1).__class__",
    "'abc'.__len__()",
    "'a'.format",
    "'{0.__class__}'.format(1)",
    "'a'.join(['b'])",
    "len.__self__",
    "'a'.upper.__globals__",
    "'a'.encode()",
    "(1).bit_length()",
    "[].append(1)",
    # lambdas, comprehensions, f-strings, walrus, containers, control flow
    "lambda: 1",
    "(lambda x: x)(1)",
    "[x for x in range(10)]",
    "{x: 1 for x in 'ab'}",
    "(x for x in 'ab')",
    "f'{1+1}'",
    "f'{().__class__}'",
    "(y := 5)",
    "[1, 2, 3]",
    "{'a': 1}",
    "(1, 2)",
    "{1, 2}",
    "1 if True else 2",
    "not 1",
    "1 and 2",
    "~1",
    "1 << 10000",
    "1 | 2",
    "b'abc'",
    "1j * 1j",
    "...",
    "None",
    "'a' in 'abc'",
    "1; 2",
    "yield 1",
    "await x",
    "*'abc'",
    "min(*'abc')",
    "round(1.5, ndigits=1)",
    # unicode tricks: fullwidth digits, homoglyph identifiers (NFKC-normalised to real names)
    "１２３ + 1",
    "ｅｖａｌ('1')",
    "ｏｐｅｎ('/etc/passwd')",
    "__ｉｍｐｏｒｔ__('os')",
    "'a'.__ｃｌａｓｓ__",
    # size bombs: powers, repetition, multiplication chains, huge literals, long input, deep nesting
    "9**9**9",
    "10**10**10",
    "2**100000",
    "(2**4000)**2",
    "99999**99999",
    "-(10**10**10)",
    "'a'*10**10",
    "'ab'*5001",
    "('a'*9000)+('b'*9000)",
    "'a'.replace('a', 'a'*10000)",
    "('a' * 100).replace('a', 'a' * 320)",
    "*".join(["99999999999999999999"] * 45),
    "*".join(["(10**90)"] * 60),
    "1" * 10_000,
    "9" * 999,
    "1+" * 600 + "1",
    "(" * 1000 + "1" + ")" * 1000,
    "(" * 150 + "1" + "+1)" * 150,
    "-" * 999 + "1",
    "-" * 300 + "1",
    "'x'" + "[0]" * 300,
    "len(" * 150 + "'a'" + ")" * 150,
    "2 ** -(10**10**10)",
    "round(5, -10**9)",
    "int('1' * 5000)",
    "float('inf')",
    "1e308 * 10",
    "(-8) ** 0.5",
    "1/0",
    "5 % 0",
    "10 // 0",
    "0 ** -1",
    "'a' * 'b'",
    "'a' - 'b'",
    "'abc'[10]",
    "'abc'['a']",
    "'abc'[::0]",
    "'a' " * 2000,
    "",
    "   ",
    "1 +",
    "\x00",
    # %-formatting builds the padded string before any size check could see it (seconds, gigabytes)
    "'%04000000000d' % 1",
    "'%.999999999f' % 1.0",
    "'%s' % 'a'",
    # commas that are not thousands separators: a decimal comma or a tuple would silently give another number
    "3,5 * 2",
    "(1,5)",
    "1,2",
    "1,2345",
]

LEGIT = {
    "2+3": "5",
    "2 + 3 * 4": "14",
    "(2 + 3) * 4": "20",
    "10 / 4": "2.5",
    "10 // 4": "2",
    "-7 // 2": "-4",
    "10 % 3": "1",
    "2 ** 10": "1024",
    "2 ** -1": "0.5",
    "-3 + +5": "2",
    "0.1 + 0.2": "0.3",
    "1 / 3": "0.333333333333",
    "3.5 * 2": "7.0",
    "1e3 + 1": "1001.0",
    "123456789 * 987654321": "121932631112635269",
    "2 ** 100": "1267650600228229401496703205376",
    "1,234 * 5": "6170",
    "12,345.5 + 0.5": "12346.0",
    "1,234,567 - 1": "1234566",
    "3 < 4 < 5": "True",
    "2 == 3": "False",
    "abs(-4.5)": "4.5",
    "round(3.14159, 2)": "3.14",
    "max(3, 9, 2)": "9",
    "min(3, 9, 2)": "2",
    "int(7.9)": "7",
    "'strawberry'.count('r')": "3",
    '"Mississippi".count("s")': "4",
    "'Mississippi'.lower().count('m')": "1",
    "len('strawberry')": "10",
    "'hello'.upper()": "HELLO",
    "'hello'[1]": "e",
    "'hello'[-1]": "o",
    "'hello'[1:3]": "el",
    "'hello'[::-1]": "olleh",
    "'banana'.find('n')": "2",
    "'ab' * 3": "ababab",
    "'ab' + 'cd'": "abcd",
    "str(12) + 'a'": "12a",
    "len(str(2 ** 100))": "31",
    "'a,b,c'.count(',')": "2",
}


@pytest.mark.parametrize("expression", HOSTILE)
def test_hostile_expressions_are_refused_quickly(expression):
    start = time.perf_counter()
    result = calculate(expression)
    elapsed = time.perf_counter() - start
    assert result.startswith("Error:"), f"{expression[:60]!r} gave {result[:60]!r}"
    assert len(result) < 200
    assert elapsed < 1.0, f"{expression[:60]!r} took {elapsed:.3f}s"  # (~1 ms measured: guards hangs, not speed)


def test_hostile_corpus_is_big_enough():
    assert len(HOSTILE) >= 50 and len(LEGIT) >= 20


@pytest.mark.parametrize("expression,expected", LEGIT.items())
def test_legitimate_expressions(expression, expected):
    start = time.perf_counter()
    assert calculate(expression) == expected
    assert time.perf_counter() - start < 1.0


def test_results_match_python_arithmetic():
    for a in (-17, -3, 0, 5, 12345):
        for b in (-4, 1, 7, 31):
            for op in ("+", "-", "*", "//", "%"):
                expr = f"({a}) {op} ({b})"
                assert calculate(expr) == str(eval(expr)), expr  # eval on trusted, test-made input only


def test_input_length_cap():
    assert calculate("1+" * (MAX_INPUT_CHARS // 2) + "1").startswith("Error:")
    assert calculate("1+" * 40 + "1") == "41"


def test_non_string_input():
    assert calculate(12).startswith("Error:")
