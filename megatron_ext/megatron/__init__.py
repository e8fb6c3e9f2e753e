"""Everything that touches megatron-core lives in this package."""
