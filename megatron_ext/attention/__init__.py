"""Exact context-parallel attention (bshd layout). Re-exports only."""
from .allgather import allgather_attention
from .hybrid import CPMesh, build_cp_mesh, hybrid_attention
from .ring import ring_attention
from .stats import CPStats, record_cp_stats
from .ulysses import ulysses_attention

__all__ = ["ring_attention", "allgather_attention", "ulysses_attention", "hybrid_attention",
           "build_cp_mesh", "CPMesh", "record_cp_stats", "CPStats"]
