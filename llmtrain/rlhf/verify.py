"""A math verifier for rule rewards: a reply's final answer (the last \\boxed{...}, else what
follows the last ####, else its last number) against the record's answer, equal as numbers or as
expressions sympy simplifies to the same thing."""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Optional

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _boxed(text: str) -> Optional[str]:
    """The contents of the last \\boxed{...} (braces nested)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, at = 0, start + len("\\boxed{") - 1
    for i in range(at, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[at + 1:i].strip()
    return None


def final_answer(reply: str) -> Optional[str]:
    boxed = _boxed(reply)
    if boxed is not None:
        return boxed
    if "####" in reply:
        after = reply.rsplit("####", 1)[1].strip()
        return after.splitlines()[0].strip() if after else None
    numbers = NUMBER.findall(reply)
    return numbers[-1] if numbers else None


def _number(text: str) -> Optional[Fraction]:
    text = text.strip().rstrip(".").replace(",", "").replace("$", "").replace(" ", "")
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


LATEX = [(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))"),
         (r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)"), (r"\\(left|right)", ""), (r"\\cdot|\\times", "*"),
         (r"\\pi", "pi"), (r"\{", "("), (r"\}", ")"), (r"\^", "**"), (r"\\!|\\,|\$", "")]


def _expression(text: str):
    from sympy import simplify
    from sympy.parsing.sympy_parser import (implicit_multiplication_application,
                                            parse_expr, standard_transformations)
    for pattern, replacement in LATEX:
        text = re.sub(pattern, replacement, text)
    try:
        return simplify(parse_expr(text, transformations=standard_transformations
                                   + (implicit_multiplication_application,), evaluate=True))
    except Exception:  # noqa: BLE001  (anything sympy cannot read is no expression)
        return None


def same_answer(found: Optional[str], expected) -> bool:
    if found is None or expected is None:
        return False
    expected = str(expected)
    a, b = _number(found), _number(expected)
    if a is not None and b is not None:
        return a == b
    if found.strip() == expected.strip():
        return True
    x, y = _expression(found), _expression(expected)
    if x is None or y is None:
        return False
    try:
        return bool(simplify_zero(x - y))
    except Exception:  # noqa: BLE001
        return False


def simplify_zero(difference) -> bool:
    from sympy import simplify
    return simplify(difference) == 0
