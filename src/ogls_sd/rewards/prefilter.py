"""Cheap shape and size limits on an extracted answer, checked before math-verify.

math-verify (sympy) evaluates numbers eagerly and its LaTeX parser slows down sharply with
nesting, so some short answers cost seconds or never finish: ``9^{9^{9^9}}``, ``1000000!``,
``\\binom{10^9}{10^8}``, ``(x+1)^{1000000}``, thirty nested ``\\frac{``. The verifier's per-item
deadline (a killed worker) bounds them, but each still costs the full deadline. :func:`reject_reason`
recognises the usual shapes in microseconds, without parsing the answer for real, so the
verifier can score them 0 (reason ``"too_complex"``) without contacting a worker; the deadline
stays the backstop for whatever gets through.

Limits (an answer is rejected when any is exceeded):

* bracket nesting (``{``, ``(``, ``[`` together) deeper than :data:`MAX_NESTING`;
* a run of more than :data:`MAX_DIGIT_RUN` digits;
* a numeric sub-expression -- digits combined with ``+ - * / \\cdot \\times``, powers, ``!``,
  ``\\frac``, ``\\sqrt``, ``\\binom``, ``\\Gamma`` -- whose value (or reciprocal) has more than
  about :data:`MAX_DIGITS` decimal digits by a cheap upper bound (``n! <= n^n``,
  ``binom(n, k) <= 2^n``), e.g. ``9^{9^9}``, ``10^{-10^{10}}``, ``(10^{10})!``, ``9!!!!``;
* a numeric exponent larger than :data:`MAX_EXPONENT` on a base that is not a number
  (``x^{10^{9}}``, ``\\prod_{k=1}^{10^{9}}``), or larger than :data:`MAX_EXPAND_EXPONENT` on a
  bracketed symbolic base (``(x+1)^{1000}``, which sympy expands).

Typical answers (``2^{2024}``, ``100!``, ``\\binom{100}{50}``, ``(x+1)^{10}``, ``e^{-x^2}``,
``\\frac{1}{\\sqrt{2^{\\frac{1}{3}}}}``) are far inside these limits. Linear in the answer's length
per power/factorial site; the verifier only calls it on answers of at most ``max_answer_chars``.
"""

from __future__ import annotations

import math
import re

__all__ = ["MAX_DIGITS", "MAX_DIGIT_RUN", "MAX_EXPAND_EXPONENT", "MAX_EXPONENT", "MAX_NESTING", "reject_reason"]

MAX_NESTING = 8
MAX_DIGIT_RUN = 500
MAX_DIGITS = 1e6
MAX_EXPONENT = 1e5
MAX_EXPAND_EXPONENT = 200

_INF = float("inf")
_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+")
_LONG_DIGITS = re.compile(r"\d{%d}" % (MAX_DIGIT_RUN + 1))
_COMMAND = re.compile(r"\\([A-Za-z]+)")
_SITE_COMMANDS = re.compile(r"\\(?:[dt]?binom|Gamma)(?![A-Za-z])")


class _Symbolic(Exception):
    """The text is not a closed numeric expression the estimator understands."""


class _TooBig(Exception):
    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


def _value(size: float) -> float:
    """|value| of a number whose size (log10 of max(|v|, 1/|v|)) is ``size``."""
    return 10.0**size if size < 300 else _INF


def _checked(size: float, what: str) -> float:
    if size > MAX_DIGITS:
        shown = "more than 10^300" if size == _INF else f"about {size:.3g}"
        raise _TooBig(f"{what} with {shown} digits")
    return size


def _factorial_size(v: float, double: bool = False) -> float:
    """An upper bound on log10(v!) (n! <= n^n); half of it for a double factorial."""
    if v < 2:
        return 0.0
    if v == _INF:
        return _INF
    s = v * math.log10(v)
    return s / 2 if double else s


def _number_size(text: str) -> float:
    whole, _, frac = text.partition(".")
    whole = whole.lstrip("0")
    if whole:
        return math.log10(float(whole[:15])) + max(0, len(whole) - 15)
    significant = frac.lstrip("0")
    if not significant:
        return 0.0  # zero
    return (len(frac) - len(significant)) + 1.0  # 0.00ddd: |log10| <= leading zeros + 1


class _Estimator:
    """Recursive descent over a small numeric grammar; returns sizes (log10 magnitudes).

    expr := [+-] term ([+-] term)* ; term := power ((* | / | \\cdot | \\times | implicit) power)* ;
    power := postfix (^ [+-] postfix)* ; postfix := atom !* ;
    atom := number | {expr} | (expr) | \\frac{}{} | \\sqrt[]{} | \\binom{}{} | \\Gamma(..)
    Anything else raises :class:`_Symbolic`; a size over the limit raises :class:`_TooBig`.
    """

    _ATOM_COMMANDS = ("frac", "sqrt", "binom", "dbinom", "tbinom", "Gamma")

    def __init__(self, s: str, i: int = 0) -> None:
        self.s = s
        self.i = i
        self.depth = 0

    def _peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def _command(self) -> str | None:
        m = _COMMAND.match(self.s, self.i)
        return m.group(1) if m else None

    def expr(self) -> float:
        self.depth += 1
        if self.depth > 4 * MAX_NESTING:
            raise _Symbolic
        if self._peek() in ("+", "-"):
            self.i += 1
        best, terms = self.term(), 1
        while self._peek() in ("+", "-"):
            self.i += 1
            best = max(best, self.term())
            terms += 1
        self.depth -= 1
        return _checked(best + math.log10(terms), "a sum") if terms > 1 else best

    def term(self) -> float:
        total = self.power()
        while True:
            c = self._peek()
            if c in ("*", "/"):
                self.i += 1
            elif self.s.startswith("\\cdot", self.i):
                self.i += 5
            elif self.s.startswith("\\times", self.i):
                self.i += 6
            elif c and (c.isdigit() or c in "({." or (c == "\\" and self._command() in self._ATOM_COMMANDS)):
                pass  # implicit product: 2(3), 2\sqrt{2}
            else:
                return total
            total = _checked(total + self.power(), "a product")

    def power(self) -> float:
        sizes = [self.postfix()]
        while self._peek() == "^":
            self.i += 1
            if self._peek() in ("+", "-"):
                self.i += 1
            sizes.append(self.postfix())
        size = sizes[-1]
        for base in reversed(sizes[:-1]):
            size = _checked(base * _value(size), "a power") if base > 0 else 0.0
        return size

    def postfix(self) -> float:
        size = self.atom()
        while self._peek() == "!":
            n = 0
            while self._peek() == "!":
                n += 1
                self.i += 1
            if n == 2:  # n!! is a double factorial
                size = _checked(_factorial_size(_value(size), double=True), "a double factorial")
            else:
                for _ in range(n):
                    size = _checked(_factorial_size(_value(size)), "a factorial")
        return size

    def _group(self, open_: str, close: str) -> float:
        if self._peek() != open_:
            raise _Symbolic
        self.i += 1
        size = self.expr()
        if self._peek() != close:
            raise _Symbolic
        self.i += 1
        return size

    def atom(self) -> float:
        c = self._peek()
        m = _NUMBER.match(self.s, self.i)
        if m:
            self.i = m.end()
            return _number_size(m.group())
        if c == "{":
            return self._group("{", "}")
        if c == "(":
            return self._group("(", ")")
        name = self._command()
        if name is None or name not in self._ATOM_COMMANDS:
            raise _Symbolic
        self.i += 1 + len(name)
        if name == "frac":
            return _checked(self._group("{", "}") + self._group("{", "}"), "a fraction")
        if name == "sqrt":
            if self._peek() == "[":
                self._group("[", "]")
                return self._group("{", "}")
            return self._group("{", "}") / 2
        if name == "Gamma":
            arg = self._group("(", ")") if self._peek() == "(" else self._group("{", "}")
            return _checked(_factorial_size(_value(arg)), "a Gamma function value")
        n = self._group("{", "}")  # binom(n, k) <= 2^n
        self._group("{", "}")
        return _checked(_value(n) * math.log10(2), "a binomial coefficient")


def _size_at(s: str, i: int, what: str = "expr") -> float | None:
    """Size of the numeric expression starting at ``s[i]`` (its ``what`` production), or None."""
    est = _Estimator(s, i)
    try:
        return getattr(est, what)()
    except _Symbolic:
        return None


def _size_of(text: str) -> float | None:
    """Size of ``text`` if the whole of it is a numeric expression, else None."""
    est = _Estimator(text)
    try:
        size = est.expr()
    except _Symbolic:
        return None
    return size if est.i == len(text) else None


def _bracket_matches(s: str) -> dict[int, int]:
    """Index of each unescaped ``{``/``(`` <-> its closing partner (both directions)."""
    match: dict[int, int] = {}
    stacks: dict[str, list[int]] = {"}": [], ")": []}
    opener = {"{": "}", "(": ")"}
    for i, c in enumerate(s):
        if i and s[i - 1] == "\\" and c in "{}":
            continue
        if c in opener:
            stacks[opener[c]].append(i)
        elif c in stacks and stacks[c]:
            j = stacks[c].pop()
            match[i], match[j] = j, i
    return match


def _max_nesting(s: str) -> int:
    depth = best = 0
    for c in s:
        if c in "{([":
            depth += 1
            best = max(best, depth)
        elif c in "})]" and depth:
            depth -= 1
    return best


def _operand_start(s: str, end: int, match: dict[int, int]) -> int | None:
    """Start of the operand that ends at ``s[end - 1]`` (for a postfix ``!``), or None."""
    k = end
    while k > 0:
        c = s[k - 1]
        if c == "!":
            while k > 0 and s[k - 1] == "!":
                k -= 1
            continue
        if c.isdigit() or c == ".":
            while k > 0 and (s[k - 1].isdigit() or s[k - 1] == "."):
                k -= 1
        elif c in ")}" and (k - 1) in match:
            k = match[k - 1]
            while k > 0 and s[k - 1] == "}" and (k - 1) in match:  # \frac{a}{b}: all arguments
                k = match[k - 1]
            m = re.search(r"\\[A-Za-z]+$", s[max(0, k - 16) : k])
            if m:
                k -= len(m.group())
        else:
            return None
        if k > 0 and s[k - 1] == "^":
            k -= 1  # the operand is an exponent: take the whole power
            continue
        return k
    return None


def _is_symbolic_sum(content: str) -> bool:
    return any(c.isalpha() for c in content) and ("+" in content[1:] or "-" in content[1:])


def _check_power(s: str, i: int, match: dict[int, int]) -> None:
    """Limits for the power whose ``^`` is at ``s[i]`` (raises :class:`_TooBig`)."""
    exp_size = _size_at(s, i + 1 + (s[i + 1 : i + 2] in ("+", "-")), "postfix")
    if exp_size is None:
        return
    exponent = _value(exp_size)
    base_size: float | None = None
    bracketed = False
    k = i
    if k > 0 and (s[k - 1].isdigit() or s[k - 1] == "."):
        while k > 0 and (s[k - 1].isdigit() or s[k - 1] == "."):
            k -= 1
        base_size = _size_of(s[k:i])
    elif k > 0 and s[k - 1] in ")}" and (k - 1) in match:
        content = s[match[k - 1] + 1 : k - 1]
        base_size = _size_of(content)
        # a sum with a letter in it, e.g. (x+1): sympy may expand the power
        bracketed = base_size is None and _is_symbolic_sum(content)
    elif k > 0 and s[k - 1] == "!":
        start = _operand_start(s, k, match)
        if start is not None:
            base_size = _size_of(s[start:k])
    if base_size is not None:
        if base_size > 0:
            _checked(base_size * exponent, "a power")
        return
    if exponent > MAX_EXPONENT:
        raise _TooBig(f"an exponent of about {exponent:.3g} on a non-numeric base")
    if bracketed and exponent > MAX_EXPAND_EXPONENT:
        raise _TooBig(f"a bracketed symbolic base raised to about {exponent:.3g}")


def reject_reason(answer: str) -> str | None:
    """Why ``answer`` is too costly to hand to math-verify, or None if it is within the limits.

    ``answer`` should be the normalized answer (:func:`ogls_sd.rewards.verifier.normalize_answer`:
    no whitespace, no ``\\left``/``\\right``). Never raises on a ``str``.
    """
    if _LONG_DIGITS.search(answer):
        return f"a run of more than {MAX_DIGIT_RUN} digits"
    depth = _max_nesting(answer)
    if depth > MAX_NESTING:
        return f"brackets nested {depth} deep (limit {MAX_NESTING})"
    if "^" not in answer and "!" not in answer and "\\" not in answer:
        return None
    match = _bracket_matches(answer)
    try:
        for m in re.finditer(r"\^", answer):
            _check_power(answer, m.start(), match)
        for m in re.finditer(r"!+(?!=)", answer):
            start = _operand_start(answer, m.start(), match)
            if start is not None:
                _size_of(answer[start : m.end()])
        for m in _SITE_COMMANDS.finditer(answer):
            _size_at(answer, m.start(), "atom")
    except _TooBig as e:
        return e.why
    except (RecursionError, ValueError, OverflowError):  # pragma: no cover - defensive
        return "an expression the size estimator cannot handle"
    return None
