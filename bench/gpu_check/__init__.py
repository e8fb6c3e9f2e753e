"""``make gpu-check``: the prepared GPU acceptance run (issue 23 item 4).

``python -m bench.gpu_check`` prints one table (section | check | result | figure |
tolerance | status) and writes bench/results/gpu_check.json. Sections:

1. the CUDA block kernels (flash bf16, efficient fp32) forward and backward against float64;
2. the packed (cu_seqlens) path of our attention against float64;
3. a 1-GPU NCCL run of the trainer (bf16, distributed optimizer): 20 iterations, save,
   resume from the midpoint, the same losses;
4. ``megatron_ext.convert.forward_logits`` on a CUDA machine against a CPU-only process;
5. our block kernel's TFLOP/s against ``scaled_dot_product_attention``, as a ratio;
6. the trainer's MFU for a ~1B model at 16K tokens (the planner's FLOP formula).

Without CUDA it runs the CPU-safe parts (sections 1-4 in a small CPU / gloo form) and
marks every CUDA-only row SKIP with its reason; CI runs that mode
(tests/test_gpu_check.py). The exit code is 1 when a row FAILs or none PASSes.
"""
