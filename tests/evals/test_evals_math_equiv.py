"""MATH answer extraction and equivalence, including the tricky spellings."""

from __future__ import annotations

import pytest

pytest.importorskip("sympy")

from sparseek.evals.math_equiv import extract_answer, is_equiv, last_boxed, normalize  # noqa: E402

EQUAL = [
    ("\\boxed{\\frac{1}{2}}", "0.5"), ("0.5", "\\dfrac12"), ("\\dfrac12", "\\frac{1}{2}"), ("\\tfrac{3}{4}", "0.75"),
    ("-\\frac{1}{2}", "-0.5"), ("x^2+1", "1+x^{2}"), ("\\frac{x+1}{2}", "\\frac12x+\\frac12"),
    ("\\text{(A)}", "A"), ("(A)", "\\text{(A)}"), ("30^\\circ", "30"), ("30^{\\circ}", "30"),
    ("[2,5)", "[2, 5)"), ("[\\frac12, 1)", "[0.5,1)"), ("(-\\infty, 3]", "(-\\infty,3]"),
    ("(-\\infty,-2)\\cup(2,\\infty)", "(-\\infty, -2) \\cup (2, \\infty)"), ("x \\in [2,5)", "[2,5)"),
    ("\\frac{\\sqrt{2}}{2}", "\\sqrt2/2"), ("2\\sqrt{3}", "\\sqrt{12}"), ("\\sqrt[3]{8}", "2"),
    ("\\pi/2", "\\frac{\\pi}{2}"), ("1,000", "1000"), ("x = 5", "5"), ("5\\text{ cm}", "5"), ("10\\%", "10"),
    ("\\$18.90", "18.9"), ("6", "6.0"), ("3+4i", "4i+3"), ("\\{1,2\\}", "\\{2,1\\}"), ("-2, 1", "1,-2"),
    ("2^{10}", "1024"), ("\\text{Evelyn}", "Evelyn"), ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
]
DIFFERENT = [
    ("[2,5)", "(2,5)"), ("(1,2)", "(2,1)"), ("2x", "2y"), ("\\frac{1}{3}", "0.333"), ("2", "3"),
    ("(-\\infty,-2)\\cup(2,\\infty)", "(-\\infty,-2)\\cup[2,\\infty)"), ("9^{9^{9^9}}", "1"), ("1/0", "1"),
    ("eval(chr(95))", "1"), ("x^2+1", "x^2-1"), (None, "1"), ("", "1"),
]


@pytest.mark.parametrize("a,b", EQUAL)
def test_equivalent(a, b):
    assert is_equiv(a, b) and is_equiv(b, a)


@pytest.mark.parametrize("a,b", DIFFERENT)
def test_not_equivalent(a, b):
    assert not is_equiv(a, b)


def test_boxed_extraction_keeps_nested_braces():
    assert last_boxed("first \\boxed{1} then $\\boxed{x^{2}+\\frac{1}{2}}$ done") == "x^{2}+\\frac{1}{2}"
    assert last_boxed("\\boxed{x^2+1}") == "x^2+1"
    assert last_boxed("so \\boxed 5$") == "5"
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("no box") is None and last_boxed("\\boxed{unclosed") is None


def test_answer_extraction_prefers_minerva_line():
    text = "We get $\\boxed{3}$.\nFinal Answer: The final answer is $\\frac{1}{2}$. I hope it is correct."
    assert extract_answer(text) == "\\frac{1}{2}"
    assert extract_answer("so $\\boxed{\\frac{1}{2}}$.") == "\\frac{1}{2}"
    assert extract_answer("Final Answer: The final answer is $[2,5)$. I hope it is correct.") == "[2,5)"
    assert extract_answer("nothing to see") is None


def test_normalize_examples():
    assert normalize("\\text{(A)}") == "A"
    assert normalize("\\dfrac12") == "\\frac{1}{2}"
    assert normalize("$ 30^\\circ $") == "30"
    assert normalize("5 \\text{ inches}") == "5"
