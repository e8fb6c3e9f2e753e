"""Sizes of the Mini-LongSkywork experiment: the full run and the toy smoke run."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Tuple


@dataclass
class StageSize:
    """How long one training stage runs."""

    iters: int
    """Training iterations."""
    global_batch: int
    """Sequences per iteration (micro-batch 1)."""
    lr: float
    """Peak learning rate (cosine to lr / 10 after warmup, unless ``wsd_decay``)."""
    warmup: int
    """Warmup iterations."""
    wsd_decay: int = 0
    """0: cosine decay. N > 0: constant lr after warmup, then linear decay to lr / 10 over the last N
    iterations (megatron-core's WSD schedule: optim.lr_decay_style WSD)."""


@dataclass
class ExperimentConfig:
    """Every size the experiment uses; the report states each one."""

    l0: int = 512
    """Short context of the base model."""
    l1: int = 4096
    """Long context after extension (8 x L0)."""
    num_layers: int = 4
    """Transformer layers."""
    hidden_size: int = 256
    """Model width."""
    num_attention_heads: int = 4
    """Attention heads (MHA: one K/V head per query head)."""
    vocab_size: int = 4000
    """sentencepiece vocabulary trained on the training documents."""
    rope_base: float = 10000.0
    """RoPE base of the base model."""
    abf_base: float = 500000.0
    """RoPE ABF base from continual pretraining on (and applied to ``base`` at evaluation)."""
    train_docs: int = 900
    """Corpus documents used for training (pretraining, CIP, concat)."""
    haystack_docs: int = 40
    """Corpus documents held out for the needle haystack; never trained on."""
    base: StageSize = field(default_factory=lambda: StageSize(2000, 4, 1e-3, 50, wsd_decay=400))
    """Pretraining at L0 from random weights (data-parallel over 2 ranks). Second run (issue #25): 2000 steps
    of 4 x 512 tokens (4.1M tokens; the first run had 600 steps of 8, 2.5M), constant lr, decay over the
    last 400. Expected: the base copies (controls.base-own-rope passkey >= 0.9 at L0)."""
    copy_share: float = 0.5
    """Share of base pretraining samples (L0 windows) drawn from copy-rich text (data_tools.synth copy), the
    rest from the training documents (disclosed in the report's setup). 0.3 with 512-token copy samples
    gave a base that did not copy at all (second run's first attempt, gate 0.00)."""
    copy_tokens: int = 256
    """Tokens per copy-rich sample, at most L0 / 2. GPTDataset concatenates samples and cuts L0 windows
    at arbitrary offsets: with samples of about L0 tokens nearly every window held the tail of one (a
    repeat without its source) and the head of the next (a source without its repeat). At <= L0 / 2
    every window holds at least one whole sample."""
    copy_span_tokens: str = "20:100"
    """``synth copy --span-tokens``: the recurring span's length range (2 x max < ``copy_tokens``)."""
    copy_kinds: str = "span=2,repeat=1,keys=2"
    """``synth copy --kinds``: recurring span, document twice, labelled random strings."""
    split_digits: bool = True
    """Tokenizer splits every digit into its own piece (as Llama's), so a key tokenizes the same twice."""
    gate_threshold: float = 0.5
    """Gate after ``base``: passkey accuracy at L0 with the base's own RoPE below this stops the run
    (override: ``--ignore-gate``)."""
    cpt: StageSize = field(default_factory=lambda: StageSize(120, 2, 3e-4, 10))
    """Continual pretraining at L1 with RoPE ABF (CP = nproc: the ring at 2)."""
    sft: StageSize = field(default_factory=lambda: StageSize(150, 8, 3e-4, 10))
    """SFT on short examples at L0 (packed)."""
    long_sft: StageSize = field(default_factory=lambda: StageSize(200, 2, 2e-4, 5))
    """Long SFT at L1 (packed, CP = nproc): exactly 200 iterations in the full run."""
    sft_question_weights: str = "lookup=4,reverse_lookup=4,multi_hop=2"
    """``synth synl --question-weights`` of every SFT mix: mostly look-ups with multi-token answers
    (names, dates, ids: several pieces each), so SFT supervises more than one token."""
    sft_targets: Tuple[int, ...] = (256, 320, 384, 448)
    """Token sizes of the short SFT examples (SynL tables small enough for L0). Not below 256: with digits
    split, the smallest table (2 rows and a question) can exceed 192 tokens."""
    sft_examples: int = 600
    """Short SFT examples (SynL tables) for the SFT stage and the packed long-SFT share."""
    long_synl_examples: int = 400
    """Long SynL examples near L1 for long SFT."""
    eval_lengths: List[int] = field(default_factory=lambda: [256, 512, 1024, 2048, 4096])
    """Evaluation context lengths: L0/2, L0, 2 L0, 4 L0, L1."""
    eval_depths: str = "0:95:5"
    """Needle depths (percent): one passkey and one needle prompt each, per length."""
    synl_eval_samples: int = 20
    """Held-out SynL prompts per length (seeds never used in training)."""
    threads_per_rank: int = 1
    """OMP threads per rank (2 ranks on 2 cores)."""
    nproc: int = 2
    """Worker ranks: 2 gloo ranks on these 2 CPU cores; on a GPU machine one per GPU (NCCL), e.g. 1
    (``--nproc``). Short stages are data-parallel over them; long stages and the evaluation run
    context-parallel with CP = nproc (the ring; at 1, the local kernel)."""

    def sizes(self) -> Dict[str, object]:
        return dataclasses.asdict(self)


PLANNED_MINUTES = 83
"""Planned wall clock of ``--arms all``, from the first run's timings (experiments/mini_longskywork/report.md,
2 cores): base 659 s / 600 steps of 8 -> ~0.14 s a 512-token sample, so 2000 x 4 samples ~ 1150 s (19 min,
with per-step overhead); gate (passkey+needle at 256/512, own RoPE) ~ 0.5 min; the other seven stages
unchanged, 3246 s (54 min); six arm evaluations ~ 6.6 min; data (tokenizer, CIP, SynL, copy text) ~ 2 min.
Total ~ 83 min <= 90. If the gate stops the run: ~ 23 min."""


def toy_config() -> ExperimentConfig:
    """The smoke test's sizes: every arm, 2 iterations per stage, one eval length."""
    two = StageSize(2, 2, 1e-3, 0)
    wsd = StageSize(2, 2, 1e-3, 0, wsd_decay=1)  # the base's schedule path
    return ExperimentConfig(l0=384, l1=768, num_layers=1, hidden_size=32, num_attention_heads=2, vocab_size=1000,
                            train_docs=40, haystack_docs=4, base=wsd, cpt=two, sft=two, long_sft=two,
                            sft_targets=(300,), sft_examples=8, long_synl_examples=4, eval_lengths=[384],
                            eval_depths="0,50", synl_eval_samples=2, copy_share=0.5,
                            copy_tokens=192, copy_span_tokens="20:90")
