"""The one rule for reading yes/no from text: the environment contract (MOESERVE_*_ENABLED),
$MOESERVE_PROGRESS and fault switches. A word outside both lists is an error, never a guess."""

from __future__ import annotations

__all__ = ["TRUE_WORDS", "FALSE_WORDS", "parse_bool"]

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("", "0", "false", "no", "off")


def parse_bool(text: str) -> bool:
    """``text`` as a switch (case and surrounding blanks ignored); ValueError otherwise."""
    low = text.strip().lower()
    if low in TRUE_WORDS:
        return True
    if low in FALSE_WORDS:
        return False
    raise ValueError("expected 1/0, true/false, yes/no or on/off")
