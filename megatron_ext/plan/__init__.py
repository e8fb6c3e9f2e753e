"""Parallelism planner: one memory model and one time model for a training layout
(the trainer's ``--dry-run`` uses the same ones). ``python -m megatron_ext.plan``."""
