"""Compare answers: MetaMath/Hendrycks string normalisation and math-verify. Pure functions."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def _fix_fracs(s: str) -> str:
    """`\\frac12` -> `\\frac{1}{2}`, `\\frac1{72}` -> `\\frac{1}{72}`."""
    head, *tails = s.split("\\frac")
    out = head
    for tail in tails:
        out += "\\frac"
        if not tail:
            raise IndexError("empty \\frac")  # Hendrycks' code fails here too; the caller compares raw strings
        if tail.startswith("{"):
            out += tail
            continue
        if len(tail) < 2:
            return s
        a, b = tail[0], tail[1]
        if b == "{":
            out += "{" + a + "}" + tail[1:]
        else:
            out += "{" + a + "}{" + b + "}" + tail[2:]
    return out


def _fix_a_slash_b(s: str) -> str:
    """`3/4` -> `\\frac{3}{4}` for plain integers only."""
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        return s
    return f"\\frac{{{a}}}{{{b}}}" if s == f"{a}/{b}" else s


def _remove_right_units(s: str) -> str:
    # In MATH, "\text{ " (with the space) only introduces units.
    if "\\text{ " in s:
        parts = s.split("\\text{ ")
        if len(parts) != 2:
            raise ValueError("several unit groups")
        return parts[0]
    return s


def _fix_sqrt(s: str) -> str:
    """`\\sqrt3` -> `\\sqrt{3}`."""
    head, *tails = s.split("\\sqrt")
    out = head
    for tail in tails:
        if not tail:
            raise IndexError("empty \\sqrt")
        out += "\\sqrt" + (tail if tail.startswith("{") else "{" + tail[:1] + "}" + tail[1:])
    return out


def normalize_math(s: str) -> str:
    """The Hendrycks MATH / MetaMath `strip_string` normalisation (same rules, same order)."""
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "")
    s = _remove_right_units(s)
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    # "k = 3" -> "3" when the left side is short
    if len(s.split("=")) == 2 and len(s.split("=")[0]) <= 2:
        s = s.split("=")[1]
    s = _fix_sqrt(s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


def strict_equal(pred: str | None, gold: str | None) -> bool:
    """MetaMath's `is_equiv`: normalised strings equal; raw strings when normalising fails."""
    if pred is None or gold is None:
        return False
    try:
        return normalize_math(pred) == normalize_math(gold)
    except (ValueError, IndexError):
        return pred == gold


def math_verify_equal(pred: str | None, gold: str | None) -> bool:
    """math-verify `parse` + `verify`, each answer read as `\\boxed{...}` so its LaTeX parser anchors on it.

    math-verify's timeouts use signals: call from the main thread."""
    if pred is None or gold is None:
        return False
    from math_verify import parse, verify

    gold_parsed = parse("\\boxed{" + gold + "}")
    pred_parsed = parse("\\boxed{" + pred + "}")
    if not gold_parsed:
        logger.warning("math-verify could not parse the gold answer %r", gold)
        return False
    return bool(verify(gold_parsed, pred_parsed))


def numbers_equal(a: float | None, b: float | None, tol: float = 1e-6) -> bool:
    return a is not None and b is not None and abs(float(a) - float(b)) <= tol * max(1.0, abs(float(b)))


def numbers_close(a: float | None, b: float | None, rel_tol: float = 1e-4) -> bool:
    """Equal within a relative 1e-4 (Qwen2.5-Math's `math_equal` tolerance), for the suite's numeric answers."""
    import math

    return a is not None and b is not None and math.isclose(float(a), float(b), rel_tol=rel_tol, abs_tol=1e-9)


def normalize_text(s: str) -> str:
    """Word answers (names, yes/no, times, ratios): lower case, no spaces, `,`, `$`, quotes or `\\text{}`, no `.`
    except a decimal point (`3:30 p.m.` -> `3:30pm`, `2.5 %` -> `2.5%`)."""
    import re

    s = s.replace("\\text{", "").replace("}", "").replace("{", "")
    s = re.sub(r"(?<!\d)\.|\.(?!\d)", "", s)
    return "".join(c for c in s.lower() if not c.isspace() and c not in ",$\"'`")


def text_equal(pred: str | None, gold: str) -> bool:
    return pred is not None and normalize_text(pred) == normalize_text(gold) != ""
