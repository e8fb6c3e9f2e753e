"""Exact context-parallel attention (bshd layout). Re-exports only."""
from .allgather import allgather_attention
from .ring import ring_attention

__all__ = ["ring_attention", "allgather_attention"]
