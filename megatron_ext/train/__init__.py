"""The training driver: ``torchrun --nproc-per-node N -m megatron_ext.train --config X.yaml [--set k=v ...]``."""
