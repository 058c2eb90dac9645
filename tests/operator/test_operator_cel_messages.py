"""What a user reads for an invalid MoEDeployment is the same field, whoever refuses it.

tests/operator/test_operator_crds.py checks that the CEL rules (run with cel-python) reject what
pydantic rejects. Here: every rule's message names a field, the field a broken rule points at is
the one pydantic names, and `moeserve operator render` prints that field with the message, for
every CEL case and the security spec's schema checks.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from moeserve.common.spec import SpecError, parse_spec
from moeserve.operator.cli import main
from tests.operator.test_operator_crds import (
    CEL_CASES,
    _default_loosely,
    _rules,
    _validator,
    _with,
    cel_violations,
)
from tests.operator.test_operator_crds import schema as crd_schema
from tests.operator.test_operator_render import example

pytestmark = pytest.mark.timeout(120)


def _render_err(doc: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    assert main(["operator", "render", "-f", str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    return captured.err


def _node(root: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    for name in path:
        root = root["properties"][name]
    return root


def test_every_rule_message_names_a_field() -> None:
    root = crd_schema("MoEDeployment")
    rules = list(_rules(root))
    assert len(rules) >= 8
    for path, rule in rules:
        words = set(re.findall(r"[A-Za-z][A-Za-z0-9]*", rule["message"]))
        # A field of the rule's object, the object itself, or the path the rule points at.
        named = set((rule.get("fieldPath") or "").strip(".").split(".")) | set(path)
        named |= set(_node(root, path).get("properties") or {})
        assert words & (named - {""}), rule


@pytest.mark.parametrize("case", sorted(CEL_CASES))
def test_cel_and_render_name_the_same_field(case: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    patch, field = CEL_CASES[case]
    doc = _with(patch)
    with pytest.raises(SpecError) as info:
        parse_spec(doc["spec"])
    stored = {**doc, "spec": _default_loosely(copy.deepcopy(doc["spec"]))}
    broken = cel_violations(stored)
    # The API server's answer points at a field of the same subtree pydantic names.
    assert any(field.startswith(b) or b.startswith(field) for b in broken), (broken, field)
    err = _render_err(doc, tmp_path, capsys)
    for name, message in info.value.problems:
        assert f"{name}: {message}" in err  # render prints pydantic's lines verbatim


SECURITY_REJECTS = {
    "empty tls secret": ({"tls": {"secretName": ""}}, "spec.security.tls.secretName"),
    "tls without secret": ({"tls": {}}, "spec.security.tls.secretName"),
    # The API server prunes unknown fields (kubectl's strict validation refuses them).
    "unknown field": ({"tsl": {"secretName": "x"}}, "spec.security.tsl"),
    "selector value not a string": ({"monitoringNamespaceSelector": {"a": 1}},
                                    "spec.security.monitoringNamespaceSelector.a"),
}


@pytest.mark.parametrize("case", sorted(SECURITY_REJECTS))
def test_security_spec_rejected_by_schema_pydantic_and_render(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    security, field = SECURITY_REJECTS[case]
    doc = copy.deepcopy(example("tiny-cpu.yaml"))
    doc["spec"]["security"] = security
    if case != "unknown field":
        assert list(_validator("MoEDeployment").iter_errors(doc)), case  # the CRD's schema
    with pytest.raises(SpecError) as info:
        parse_spec(doc["spec"])
    assert field in info.value.fields, info.value.fields
    assert field in _render_err(doc, tmp_path, capsys)
