"""Everything that touches megatron-core lives in this package.

megatron-core announces at import that the optional GPU extras (Apex, TransformerEngine)
are missing. On CPU that is expected, so the megatron-core modules this package builds on
are imported once here with exactly those notices (data_tools.quiet.GPU_FALLBACK) silenced
inside ``catch_warnings``: no warning filter outlives this import. On CUDA, or with
``-v``/``MEGATRON_EXT_VERBOSE=1``, they are shown: there they mean slower kernels.
"""
import importlib
import warnings

from data_tools.quiet import GPU_FALLBACK, verbose_requested

with warnings.catch_warnings():
    import torch  # inside: as before, the filters torch and numpy install at import do not outlive this block

    if not torch.cuda.is_available() and not verbose_requested():
        _message, _category, _module = GPU_FALLBACK
        warnings.filterwarnings("ignore", message=_message, category=_category, module=_module)
    for _name in ("megatron.core.models.gpt.gpt_layer_specs", "megatron.core.models.gpt"):
        importlib.import_module(_name)
del _name
