"""The data description of a config: which datasets the run builds, from which files,
and how. One function, :func:`describe_data`, serves ``validate()`` (the rules), the
run (``data.build_datasets`` builds from it) and the dry run (it prints it), so a
config the run cannot build never passes the dry run. No torch, no file reads beyond
``os.path.exists``."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Tuple

SUFFIXES = {"text": "_text_document", "mask": "_loss_mask_document"}


@dataclass(frozen=True)
class DataDescription:
    """What the run builds from ``data``."""

    builder: str
    """"packed_sft" (PackedSftDataset: whole examples, blends weighted by example count)
    or "gpt" (megatron-core's BlendedMegatronDatasetBuilder over GPTDataset)."""
    prefixes: Tuple[str, ...]
    """Data prefixes, without the ``_text_document`` suffix."""
    weights: Tuple[float, ...]
    """Blend weights, one per prefix."""
    suffixes: Tuple[str, ...]
    """Indexed datasets read per prefix (``_text_document``, and ``_loss_mask_document`` with sft)."""
    seq_length: int
    """Tokens per sample."""
    split: str
    """train,valid,test shares."""
    document_masks: bool
    """Per-document attention inside concatenated samples (gpt builder only)."""

    def files(self) -> List[str]:
        """Every ``.bin``/``.idx`` file the run opens."""
        return [p + s + ext for p in self.prefixes for s in self.suffixes for ext in (".bin", ".idx")]

    def missing(self) -> List[str]:
        """The files of :meth:`files` not present on this machine."""
        return [f for f in self.files() if not os.path.exists(f)]

    def summary(self) -> str:
        """One line for the dry run and the log."""
        blend = ", ".join(f"{w:g} x {p}" for w, p in zip(self.weights, self.prefixes))
        how = ("packed SFT (whole examples, blend weighted by example count)" if self.builder == "packed_sft"
               else "megatron-core GPTDataset" + (" + SFT loss masks" if len(self.suffixes) > 1 else "")
               + (" with document masks" if self.document_masks else ""))
        return f"data: {how}; blend {blend}; seq_length {self.seq_length}; split {self.split}"


def describe_data(data, packing: str) -> DataDescription:
    """The description of ``data`` (a DataConfig) at packing mode ``packing`` ("none"|"sft",
    from config.packing_mode). Raises ValueError naming the key and the rule broken."""
    blend = list(data.blend)
    if not blend or len(blend) % 2:
        raise ValueError(f"data.blend must be [weight, prefix, weight, prefix, ...], got {blend}")
    weights, prefixes = [], []
    for i in range(0, len(blend), 2):
        w, p = blend[i], blend[i + 1]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w <= 0:
            raise ValueError(f"data.blend[{i}]: weight {w!r} of {p!r} must be a positive number")
        if not isinstance(p, str) or not p:
            raise ValueError(f"data.blend[{i + 1}]: prefix {p!r} must be a non-empty path")
        weights.append(float(w))
        prefixes.append(p)
    if len(set(prefixes)) != len(prefixes):
        raise ValueError(f"data.blend names a prefix twice ({prefixes}): give it one weight")
    if packing == "sft" and data.document_masks:
        raise ValueError("data.document_masks applies to data.packing=none (packed SFT masks documents "
                         "already); unset one of them")
    suffixes = (SUFFIXES["text"], SUFFIXES["mask"]) if data.sft or packing == "sft" else (SUFFIXES["text"],)
    return DataDescription("packed_sft" if packing == "sft" else "gpt", tuple(prefixes), tuple(weights), suffixes,
                           data.seq_length, data.split, bool(data.document_masks))
