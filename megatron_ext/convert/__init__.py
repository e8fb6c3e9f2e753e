"""Hugging Face <-> megatron_ext checkpoints (Llama, Mistral, Qwen2), and
:class:`LogitsModel` (load once, then ``.logits(ids)``) and :func:`forward_logits` to compare
our model's logits with anyone else's."""
from .api import export_hf, import_hf
from .hf_config import ConversionError
from .logits import LogitsModel, forward_logits

__all__ = ["LogitsModel", "forward_logits", "import_hf", "export_hf", "ConversionError"]
