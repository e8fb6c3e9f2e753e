"""Everything that touches megatron-core lives in this package.

megatron-core announces at import that the optional GPU extras (Apex, TransformerEngine)
are missing, which is expected on CPU. The megatron-core modules this package builds on
are imported once here with exactly those notices silenced inside ``catch_warnings``, so
no warning filter outlives this import (the process's filters are left as they were).
"""
import importlib
import warnings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r".*(Apex is not installed|Transformer Engine and Apex are not installed).*")
    for _name in ("megatron.core.models.gpt.gpt_layer_specs", "megatron.core.models.gpt"):
        importlib.import_module(_name)
del _name
