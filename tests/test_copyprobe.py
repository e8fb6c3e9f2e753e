"""The Mini-LongSkywork copy probe: it must tell a model that copies from one that does not."""
import math
import subprocess
import sys

import torch

from megatron_ext.experiments.mini_longskywork.copyprobe import COPIES_MARGIN, induction


class Copier:
    """Exact induction rule: after token t, predict what followed t's previous occurrence (else uniform)."""

    def __init__(self, vocab):
        self.vocab = vocab

    def logits(self, ids):  # [1, s] -> [1, s, vocab]
        out = torch.zeros(1, ids.shape[1], self.vocab)
        seen = {}
        for i, t in enumerate(ids[0].tolist()):
            if t in seen:
                out[0, i, ids[0, seen[t] + 1]] = 50.0
            seen[t] = i
        return out


class Uniform(Copier):
    def logits(self, ids):
        return torch.zeros(1, ids.shape[1], self.vocab)


def test_induction_probe_separates_a_copier_from_a_uniform_model():
    vocab = 4000
    copy = induction(Copier(vocab), vocab, 16, trials=4)
    flat = induction(Uniform(vocab), vocab, 16, trials=4)
    assert abs(flat["first_copy_loss"] - math.log(vocab)) < 1e-4 and abs(flat["second_copy_loss"] - math.log(vocab)) < 1e-4
    assert copy["second_copy_loss"] < 1e-3  # every repeated token predicted
    assert copy["first_copy_loss"] - copy["second_copy_loss"] >= COPIES_MARGIN


def test_cli_names_a_missing_checkpoint(tmp_path):
    res = subprocess.run([sys.executable, "-m", "megatron_ext.experiments.mini_longskywork.copyprobe",
                          "--checkpoint", str(tmp_path / "nowhere"), "--tokenizer-model", str(tmp_path / "t.model")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "nowhere" in res.stderr, res.stderr[-2000:]
