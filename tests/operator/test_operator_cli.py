"""`moeserve operator render` and the status computation, without a cluster."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moeserve.common.spec import parse_manifest
from moeserve.operator.cli import main
from moeserve.operator.status import degraded_status, deployment_status

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "tiny-cpu.yaml"
pytestmark = pytest.mark.timeout(120)


def test_render_prints_multi_doc_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["operator", "render", "-f", str(TINY)]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["kind"] for d in docs].count("StatefulSet") == 2
    assert all(d["metadata"]["namespace"] == "default" for d in docs)


def test_render_invalid_names_field_exit_2(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    doc = yaml.safe_load(TINY.read_text())
    doc["spec"]["decode"]["parallelism"]["ep"] = 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    assert main(["operator", "render", "-f", str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "spec.decode.parallelism.ep" in captured.err and "Traceback" not in captured.err


def test_render_bad_yaml_and_missing_file(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec: [unclosed")
    assert main(["operator", "render", "-f", str(bad)]) == 2
    assert main(["operator", "render", "-f", str(tmp_path / "nope.yaml")]) == 2
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.slow
def test_moeserve_entry_point_has_operator_commands(tmp_path: Path) -> None:
    """Through the main CLI, as a user types it."""
    ok = subprocess.run([sys.executable, "-m", "moeserve.cli", "operator", "render", "-f",
                         str(TINY)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "kind: StatefulSet" in ok.stdout
    doc = yaml.safe_load(TINY.read_text())
    doc["spec"]["prefill"]["gpusPerPod"] = 8
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    fail = subprocess.run([sys.executable, "-m", "moeserve.cli", "operator", "render", "-f",
                           str(bad)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert fail.returncode == 2
    assert "spec.prefill.parallelism.ep" in fail.stderr and "Traceback" not in fail.stderr


def test_status_ready_only_when_all_groups_and_router_ready() -> None:
    dep = parse_manifest(yaml.safe_load(TINY.read_text()))
    groups = {"prefill": 1, "decode": 2}

    def sts(role: str, group: int, ready: int) -> dict:
        return {"metadata": {"labels": {"moeserve.io/role": role, "moeserve.io/group":
                                        str(group)}}, "status": {"readyReplicas": ready}}

    partial = [sts("prefill", 0, 1), sts("decode", 0, 2), sts("decode", 1, 1)]
    router = {"status": {"readyReplicas": 1}}
    status = deployment_status(dep, groups, partial, router, "e", None, "t0")
    assert status.phase == "Progressing" and status.ready == "2/3"
    assert "decode 1/2 groups" in status.conditions[0].message
    full = [*partial[:2], sts("decode", 1, 2), sts("decode", 5, 2)]  # group 5: being pruned
    status = deployment_status(dep, groups, full, router, "e",
                               [c.model_dump(by_alias=True) for c in status.conditions], "t1")
    assert status.phase == "Ready" and status.ready == "3/3"
    ready = status.conditions[0]
    assert (ready.type, ready.status, ready.last_transition_time) == ("Ready", "True", "t1")
    assert status.conditions[2].last_transition_time == "t0"  # Degraded stayed False
    assert deployment_status(dep, groups, full, None, "e", None, "t").phase == "Progressing"


def test_degraded_status_keeps_transition_time_while_unchanged() -> None:
    first = degraded_status(None, 3, "InvalidSpec", "spec.x: bad", "t0")
    again = degraded_status(first, 3, "InvalidSpec", "spec.x: bad", "t1")
    assert first == again and first["phase"] == "Degraded"
