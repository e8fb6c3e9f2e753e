"""Experiments that run the whole recipe end to end (above train/eval in the layering)."""
