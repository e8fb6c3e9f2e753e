"""Long-context evaluation of megatron_ext.train checkpoints.

* :mod:`.model`    loads a checkpoint at any CP size and checks it against the
                   tokenizer and the lengths asked for (RoPE range).
* :mod:`.scoring`  teacher-forced greedy-match score and mean log-probability of
                   an answer in one context-parallel forward; step-by-step
                   greedy decoding as the reference.
* :mod:`.results`  per-cell JSON (resumable), summary.csv, heatmap, passkey table.
* :mod:`.needle`   the sweep CLI: ``torchrun -m megatron_ext.eval.needle``.
"""
