"""Golden YAML: `moeserve operator render` of each example, byte for byte.

Regenerate after an intended change, then review the diff like code:

    MOESERVE_UPDATE_GOLDEN=1 python -m pytest tests/operator/test_operator_golden.py
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from moeserve.operator.cli import render_documents

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"
# Only MoEDeployment manifests: examples/ also holds other files (a Ray Serve config).
EXAMPLES = sorted(p for p in (REPO / "examples").glob("*.yaml")
                  if "kind: MoEDeployment" in p.read_text())
pytestmark = pytest.mark.timeout(60)


def render_text(example: Path) -> str:
    import yaml

    docs = render_documents(example.read_text())
    return yaml.safe_dump_all(docs, sort_keys=False, width=100)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_render_matches_golden(example: Path) -> None:
    golden = GOLDEN / example.name
    text = render_text(example)
    if os.environ.get("MOESERVE_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert golden.exists(), f"no golden file; run with MOESERVE_UPDATE_GOLDEN=1 ({golden})"
    assert text == golden.read_text(), (
        f"render of {example.name} changed; if intended, regenerate with "
        "MOESERVE_UPDATE_GOLDEN=1 python -m pytest tests/operator/test_operator_golden.py"
    )


def test_every_golden_file_has_an_example() -> None:
    assert {p.name for p in GOLDEN.glob("*.yaml")} == {p.name for p in EXAMPLES}
