"""The kernel backend of a step: in force while its stages run, undone after, never a flag on
a module (the kernel path itself is checked in tests/kernels/test_model_kernel_path.py)."""

from __future__ import annotations

import pytest
import torch

from moeserve.worker.model.forward_context import kernel_backend, kernels_on, run_stages


def _stage(log: list[str], name: str, x: torch.Tensor):
    log.append(f"{name}:{kernels_on(x)}")
    yield
    log.append(f"{name}:{kernels_on(x)}")
    return x + 1


def test_backend_holds_for_interleaved_stages_and_is_undone(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # kernels may run on CPU tensors
    x, log = torch.zeros(2), []
    outs = run_stages([_stage(log, "a", x), _stage(log, "b", x)], "triton")
    assert log == ["a:True", "b:True", "a:True", "b:True"]  # round-robin, backend throughout
    assert [o.tolist() for o in outs] == [[1.0, 1.0], [1.0, 1.0]]
    assert not kernels_on(x)  # the default backend again after the step
    with kernel_backend("triton"):
        run_stages([_stage(log, "c", x)], "torch")
        assert kernels_on(x)  # a nested step restores the outer one


def test_kernels_follow_the_tensor_as_well_as_the_backend(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with kernel_backend("triton"):
        assert not kernels_on(torch.zeros(1))  # a CPU tensor without the interpreter


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="'cuda'"):
        run_stages([], "cuda")  # type: ignore[arg-type]
