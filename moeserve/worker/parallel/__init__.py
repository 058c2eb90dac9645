"""Wide expert parallelism: DP attention + EP MoE across processes, EPLB, dual-batch overlap.

group.py (who is who, health), dispatch.py (all-to-all backends), eplb.py (placement),
expert_parallel.py (MoE layers over the group), dbo.py (micro-batch overlap), launch.py
(one process per rank). Nothing is imported here eagerly: torch.distributed set-up happens in
`init_parallel`, never at import.
"""

__all__: list[str] = []
