"""Data tools: synthetic long-context corpora, tokenizer training, pre-tokenization to Megatron indexed binaries."""
