"""Kernel tests run the Triton kernels through Triton's interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at conftest
import, ahead of any test module (and only without CUDA: on a GPU the compiled kernels run).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# Imported here so a missing triton fails the whole kernel suite instead of skipping it.
import triton  # noqa: E402, F401  (must follow the environment variable above)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _patch_interpreter_bf16_dot() -> None:
    """The interpreter multiplies bf16 operands of tl.dot as their raw uint16 storage.

    numpy has no bfloat16, so the interpreter keeps bf16 tensors as uint16 and its create_dot
    only widens fp8 before np.matmul; bf16 dots come out as nonsense. Widening bf16 to float32
    first gives what the GPU computes (bf16 products, float32 accumulation).
    """
    from triton.language import core as tl_core
    from triton.runtime import interpreter as interp

    builder_cls = interp.InterpreterBuilder
    if getattr(builder_cls, "_moeserve_bf16_dot", False):
        return
    original = builder_cls.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl_core.bfloat16 or b.dtype.scalar == tl_core.bfloat16:
            a = _widen(a)
            b = _widen(b)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    def _widen(h):
        if h.dtype.scalar != tl_core.bfloat16:
            return h
        data = interp._convert_float(h.data, tl_core.bfloat16, tl_core.float32, None)
        return interp.TensorHandle(data.view("float32"), tl_core.float32)

    builder_cls.create_dot = create_dot
    builder_cls._moeserve_bf16_dot = True


def _patch_interpreter_fp8_rounding() -> None:
    """The interpreter's narrowing float casts do not round like the GPU.

    Its _convert_float truncates float32 -> bf16 (the GPU rounds to nearest even) and, for
    e4m3, ORs a rounded-up mantissa into the exponent bits, so 124..128 becomes 64 where the
    GPU's cvt.rn gives 128. torch's own casts round like the GPU.
    """
    import numpy as np
    from triton.language import core as tl_core
    from triton.runtime import interpreter as interp

    if getattr(interp, "_moeserve_fp8_rounding", False):
        return
    original = interp._convert_float
    wide = {tl_core.float32: torch.float32, tl_core.float16: torch.float16,
            tl_core.bfloat16: torch.bfloat16}
    signed = {tl_core.float32: np.int32, tl_core.float16: np.int16, tl_core.bfloat16: np.int16}

    narrow = {tl_core.float8e4nv: (torch.float8_e4m3fn, torch.uint8),
              tl_core.bfloat16: (torch.bfloat16, torch.int16)}

    def convert_float(data, input_dtype, output_dtype, rounding_mode):
        if output_dtype in narrow and input_dtype in wide and input_dtype != output_dtype:
            bits = np.ascontiguousarray(data).view(signed[input_dtype])
            floats = torch.from_numpy(bits).view(wide[input_dtype])
            out_dtype, out_bits = narrow[output_dtype]
            out = floats.to(out_dtype).view(out_bits).numpy()
            return out.view(np.uint8 if out_bits == torch.uint8 else np.uint16).reshape(data.shape)
        return original(data, input_dtype, output_dtype, rounding_mode)

    interp._convert_float = convert_float
    interp._moeserve_fp8_rounding = True


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_interpreter_bf16_dot()
    _patch_interpreter_fp8_rounding()


@pytest.fixture
def device() -> str:
    return DEVICE


__all__ = ["DEVICE"]
