"""megatron-ext: long-context training for Megatron-Core (context parallelism,
the LongSkywork recipe, data and launch tools)."""

__version__ = "0.1.0"
