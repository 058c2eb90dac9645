"""The KV cache budget is this process's fraction of the GPU (common/kv_budget.py), not what is
free: workers sharing one device each get their share; made-up device numbers, no GPU."""

from __future__ import annotations

import pytest

from moeserve.common.kv_budget import KvBudgetError, kv_cache_budget
from moeserve.common.memory_plan import GIB

H200 = 141 * 10**9
WEIGHTS = 32 * GIB  # V2-Lite in bf16, as the allocator holds it after loading
WORKSPACE = 1 * GIB


def test_two_workers_at_045_each_fit_one_gpu() -> None:
    # The first worker loaded and took its KV cache; the second one sizes its own now.
    first = kv_cache_budget(0.45, H200, WEIGHTS, free=H200 - WEIGHTS - WORKSPACE)
    first_used = WEIGHTS + WORKSPACE + first.bytes
    free_for_second = H200 - first_used - WEIGHTS - WORKSPACE
    second = kv_cache_budget(0.45, H200, WEIGHTS, free=free_for_second)
    assert first.bytes > 0 and second.bytes > 0
    assert not first.capped and not second.capped
    assert first.bytes == second.bytes == int(0.45 * H200) - WEIGHTS - WORKSPACE
    assert first_used + WEIGHTS + WORKSPACE + second.bytes <= 0.9 * H200 + 1


def test_a_lone_worker_at_09_keeps_a_tenth_free() -> None:
    b = kv_cache_budget(0.9, H200, WEIGHTS, free=H200 - WEIGHTS - WORKSPACE)
    assert WEIGHTS + WORKSPACE + b.bytes == int(0.9 * H200)


def test_other_processes_cap_the_budget_at_free_memory_and_say_so() -> None:
    free = 40 * GIB  # another process took most of the device
    b = kv_cache_budget(0.9, H200, WEIGHTS, free=free)
    assert b.capped and b.bytes == free - WORKSPACE < b.share_bytes
    line = b.describe(0.9, H200, WEIGHTS, free)
    assert "capped at free memory" in line and "40.00 GiB free" in line


def test_no_room_names_utilization_total_weights_and_others() -> None:
    with pytest.raises(KvBudgetError) as e:
        kv_cache_budget(0.2, H200, WEIGHTS, free=H200 - WEIGHTS - WORKSPACE)
    msg = str(e.value)
    assert "gpu-memory-utilization 0.2" in msg and "131.32 GiB" in msg
    assert "this process holds 32.00 GiB" in msg
    with pytest.raises(KvBudgetError, match="other processes hold 99.00 GiB"):
        kv_cache_budget(0.9, H200, WEIGHTS, free=H200 - WEIGHTS - 99 * GIB)


@pytest.mark.parametrize("util", [0, -0.1, 1.5])
def test_utilization_out_of_range_is_named(util: float) -> None:
    with pytest.raises(KvBudgetError, match=r"gpu-memory-utilization must be in \(0, 1\]"):
        kv_cache_budget(util, H200, WEIGHTS, free=H200)
