"""Final answers of MATH-style solutions: ``\\boxed{}`` extraction, normalisation, equivalence.

``is_equiv(pred, gold)`` first compares normalised strings (units, ``\\text{}``, degree signs,
``\\dfrac``/``\\frac12`` spellings, spaces, thousands separators, "x =" prefixes and answer-choice
parentheses are dropped), then compares intervals, tuples and lists element by element, and
finally checks mathematical equality with sympy: numbers exactly (to 1e-9 relative), expressions
with free variables at random points. The LaTeX-to-sympy step is our own small converter over a
whitelisted alphabet (no ``eval`` of arbitrary text, no antlr), and every sympy call runs under
a size guard and, in the main thread, a time limit.
"""

from __future__ import annotations

import contextlib
import random
import re
import signal
import threading

# ---------------------------------------------------------------------- extraction


def match_brace(s: str, i: int) -> int:
    """Index of the brace closing the one at ``s[i]`` (-1 when unbalanced)."""
    depth = 0
    for j in range(i, len(s)):
        if s[j] == "{" and (j == 0 or s[j - 1] != "\\"):
            depth += 1
        elif s[j] == "}" and (j == 0 or s[j - 1] != "\\"):
            depth -= 1
            if depth == 0:
                return j
    return -1


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces kept), or ``\\boxed 5``."""
    i = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if i < 0:
        return None
    j = i + (len("\\boxed") if text.startswith("\\boxed", i) else len("\\fbox"))
    while j < len(text) and text[j] == " " and j + 1 < len(text) and text[j + 1] == "{":
        j += 1
    if j < len(text) and text[j] == "{":
        k = match_brace(text, j)
        return text[j + 1:k] if k != -1 else None
    m = re.match(r"\s+([^\s$]+)", text[j:])
    return m.group(1) if m else None


_FINAL = re.compile(r"[Ff]inal [Aa]nswer:\s*[Tt]he final answer is\s*(.*?)\.?\s*I hope it is correct", re.S)


def extract_answer(completion: str) -> str | None:
    """Minerva's "Final Answer: The final answer is X. I hope it is correct." else the last \\boxed{}."""
    m = _FINAL.findall(completion)
    if m:
        ans = m[-1].strip()
        boxed = last_boxed(ans)
        return boxed if boxed is not None else ans.strip("$ ").rstrip(".")
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    m = re.findall(r"[Tt]he (?:final )?answer is\s*\$?([^$\n]+?)\$?\s*(?:\.\s|\.?$)", completion)
    return m[-1].strip() if m else None


# ---------------------------------------------------------------------- normalisation
_UNITS = (r"degrees?|radians?|cm|centimeters?|m|meters?|km|kilometers?|mm|in|inch(?:es)?|ft|feet|foot|"
          r"yards?|miles?|units?|sq|square|cubic|dollars?|cents?|mph|hours?|minutes?|seconds?|days?|weeks?|"
          r"years?|points?|people|students?|ways?|pounds?|ounces?|liters?|grams?|kg")
_TEXT = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|mbox|operatorname)\s*\{([^{}]*)\}")


def normalize(ans: str) -> str:
    s = ans.strip()
    if s.startswith(("\\boxed", "\\fbox")):
        s = last_boxed(s) or s
    s = s.strip().strip("$").strip().replace("\n", " ")
    for a, b in (("\\left", ""), ("\\right", ""), ("\\displaystyle", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""),
                 ("\\:", ""), ("dfrac", "frac"), ("tfrac", "frac"), ("^{\\circ}", ""),
                 ("^\\circ", ""), ("\\circ", ""), ("\\%", ""), ("%", ""), ("\\$", ""), ("$", ""),
                 ("\\lbrace", "\\{"), ("\\rbrace", "\\}")):
        s = s.replace(a, b)
    s = re.sub(r"(?<!\\)\\ ", " ", s)  # "\ " is a space, "\\ " a matrix row break
    while True:
        t = _TEXT.sub(r"\1", s)
        if t == s:
            break
        s = t
    s = re.sub(r"(?:\^\{?\d\}?)?\s*\b(?:" + _UNITS + r")\b\s*(?:\^\{?\d\}?)?\s*$", "", s).strip()
    s = re.sub(r"^[a-zA-Z]\s*(?:=|\\in)\s*(?!.*=)", "", s)  # "x = 5", "x \in [2,5)"
    s = s.replace(" ", "")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d|[a-zA-Z](?![a-zA-Z]))", r"\\sqrt{\1}", s)
    s = re.sub(r"(^|[^\d])\.(\d)", r"\g<1>0.\2", s)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    s = s.rstrip(".")
    m = re.fullmatch(r"\(([A-Ea-e])\)|([A-E])", s)
    if m:
        s = (m.group(1) or m.group(2)).upper()
    return s


def split_top(s: str) -> list[str]:
    """Split at commas outside brackets and braces."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts


# ---------------------------------------------------------------------- equivalence
def is_equiv(pred: str | None, gold: str) -> bool:
    if pred is None:
        return False
    a, b = normalize(pred), normalize(gold)
    return _equiv(a, b)


def _equiv(a: str, b: str) -> bool:
    if a == b:
        return True
    if not a or not b:
        return False
    if "\\cup" in a or "\\cup" in b:  # unions of intervals, piece by piece
        ua, ub = a.split("\\cup"), b.split("\\cup")
        return len(ua) == len(ub) and all(map(_equiv, ua, ub))
    sa, sb = _as_set(a), _as_set(b)
    if sa is not None or sb is not None:  # \{...\}: unordered
        return sa is not None and sb is not None and _multiset_equal(sa, sb)
    if a[0] in "([" and a[-1] in ")]" and b[0] in "([" and b[-1] in ")]":
        pa, pb = split_top(a[1:-1]), split_top(b[1:-1])
        if len(pa) > 1 or len(pb) > 1:  # interval or tuple: brackets and elements in order
            return (a[0], a[-1]) == (b[0], b[-1]) and len(pa) == len(pb) and all(map(_equiv, pa, pb))
    pa, pb = split_top(a), split_top(b)
    if len(pa) > 1 or len(pb) > 1:  # a list of solutions: any order
        return _multiset_equal(pa, pb)
    return sympy_equal(a, b)


def _as_set(s: str) -> list[str] | None:
    if s.startswith("\\{") and s.endswith("\\}"):
        return split_top(s[2:-2])
    return None


def _multiset_equal(xs: list[str], ys: list[str]) -> bool:
    if len(xs) != len(ys):
        return False
    left = list(ys)
    for x in xs:
        for k, y in enumerate(left):
            if _equiv(x, y):
                del left[k]
                break
        else:
            return False
    return True


_FUNCS = {"sqrt", "pi", "oo", "log", "sin", "cos", "tan", "sec", "csc", "cot", "exp", "asin", "acos", "atan"}
_LATEX_FUNCS = {"\\sin": "sin", "\\cos": "cos", "\\tan": "tan", "\\sec": "sec", "\\csc": "csc", "\\cot": "cot",
                "\\ln": "log", "\\log": "log", "\\exp": "exp", "\\arcsin": "asin", "\\arccos": "acos",
                "\\arctan": "atan", "\\pi": "pi", "\\infty": "oo", "\\cdot": "*", "\\times": "*", "\\div": "/"}


def _group(s: str, i: int) -> tuple[str, int]:
    """One LaTeX argument at s[i]: a braced group or a single character."""
    if i < len(s) and s[i] == "{":
        k = match_brace(s, i)
        if k == -1:
            raise ValueError("unbalanced braces")
        return s[i + 1:k], k + 1
    if i < len(s):
        return s[i], i + 1
    raise ValueError("missing argument")


def latex_to_expr(s: str) -> str:
    """A sympy-parsable string for a small LaTeX subset (fractions, roots, powers, functions)."""
    out, i = "", 0
    while i < len(s):
        if s.startswith("\\frac", i):
            num, i = _group(s, i + 5)
            den, i = _group(s, i)
            out += f"(({latex_to_expr(num)})/({latex_to_expr(den)}))"
        elif s.startswith("\\sqrt", i):
            i += 5
            root = None
            if i < len(s) and s[i] == "[":
                k = s.index("]", i)
                root, i = s[i + 1:k], k + 1
            arg, i = _group(s, i)
            arg = latex_to_expr(arg)
            out += f"(({arg})**(1/({latex_to_expr(root)})))" if root else f"sqrt({arg})"
        elif s[i] == "\\":
            m = re.match(r"\\[a-zA-Z]+", s[i:])
            name = m.group(0) if m else s[i:i + 2]
            if name not in _LATEX_FUNCS:
                raise ValueError(f"unsupported LaTeX {name}")
            out += f" {_LATEX_FUNCS[name]} "
            i += len(name)
        else:
            out += s[i]
            i += 1
    return out.replace("{", "(").replace("}", ")").replace("^", "**")


def _safe_names(expr: str) -> str:
    """Keep whitelisted function names; spell any other word as a product of one-letter symbols."""
    def fix(m):
        w = m.group(0)
        return w if w in _FUNCS or len(w) == 1 else "*".join(w)

    return re.sub(r"[A-Za-z]+", fix, expr)


@contextlib.contextmanager
def _time_limit(seconds: float):
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def boom(*_):
        raise TimeoutError("sympy took too long")

    old = signal.signal(signal.SIGALRM, boom)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def to_sympy(s: str):
    import sympy
    from sympy.parsing.sympy_parser import (convert_xor, implicit_multiplication_application, parse_expr,
                                            standard_transformations)

    if len(s) > 200:
        raise ValueError("too long")
    expr = _safe_names(latex_to_expr(s))
    if not re.fullmatch(r"[0-9A-Za-z+\-*/().\s]*", expr) or re.search(r"\d{40}", expr):
        raise ValueError("not a plain expression")
    names = {w for w in re.findall(r"[A-Za-z]+", expr) if w not in _FUNCS}
    env = {"__builtins__": {}, "Integer": sympy.Integer, "Float": sympy.Float, "Rational": sympy.Rational,
           "Symbol": sympy.Symbol, "Function": sympy.Function,
           "Add": sympy.Add, "Mul": sympy.Mul, "Pow": sympy.Pow, "sqrt": sympy.sqrt, "pi": sympy.pi, "oo": sympy.oo,
           "log": sympy.log, "exp": sympy.exp, "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan,
           "sec": sympy.sec, "csc": sympy.csc, "cot": sympy.cot, "asin": sympy.asin, "acos": sympy.acos,
           "atan": sympy.atan}
    local = {n: sympy.Symbol(n) for n in names}
    tr = standard_transformations + (implicit_multiplication_application, convert_xor)
    e = parse_expr(expr, local_dict=local, global_dict=env, transformations=tr, evaluate=False)
    for p in e.atoms(sympy.Pow):
        if p.exp.is_number and abs(complex(p.exp.evalf(15))) > 1000:
            raise ValueError("exponent too large")
    return e


def sympy_equal(a: str, b: str, tol: float = 1e-9) -> bool:
    try:
        import sympy
    except ImportError:
        return False
    try:
        with _time_limit(2.0):
            ea, eb = to_sympy(a), to_sympy(b)
            if ea == eb:
                return True
            syms = sorted(ea.free_symbols | eb.free_symbols, key=str)
            if ea.free_symbols != eb.free_symbols:
                return False
            rng = random.Random(0)
            points = [{}] if not syms else [{x: sympy.Rational(rng.randint(11, 29), 7) for x in syms}
                                            for _ in range(3)]
            for pt in points:
                va = complex(ea.subs(pt).evalf(30))
                vb = complex(eb.subs(pt).evalf(30))
                if not (abs(va - vb) <= tol * max(1.0, abs(vb))):
                    return False
            return True
    except Exception:  # unparsable, undefined at the point, too slow: not shown equal
        return False
