"""Whether two workers' KV caches are interchangeable: a readable compatibility fingerprint.

Workers publish it (Health, KV handles); the router refuses a prefill -> decode pairing whose
fingerprints differ and the decode worker refuses a handle that does not match, both naming the
field that differs.
"""

from __future__ import annotations

__all__ = ["compat_fingerprint", "fingerprint_mismatch"]


def compat_fingerprint(fields: dict[str, object]) -> str:
    """``key=value;...`` over what must match for KV to be reusable across two workers.

    Readable on purpose: a mismatch is reported by the name of the field that differs.
    """
    bad = [k for k in fields if any(c in str(k) + str(fields[k]) for c in ";=")]
    if bad:
        raise ValueError(f"fingerprint fields {bad} contain ';' or '='")
    return ";".join(f"{k}={fields[k]}" for k in sorted(fields))


def fingerprint_mismatch(ours: str, theirs: str) -> str | None:
    """None when the fingerprints agree, else which fields differ (ours vs theirs)."""
    if ours == theirs:
        return None

    def parse(fp: str) -> dict[str, str]:
        return dict(part.split("=", 1) for part in fp.split(";") if "=" in part)

    a, b = parse(ours), parse(theirs)
    diffs = [
        f"{k}: ours={a.get(k, '<missing>')} theirs={b.get(k, '<missing>')}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]
    return "; ".join(diffs) or "fingerprints differ"
