"""Everything that touches megatron-core lives in this package."""
import warnings

# megatron-core announces at import that the optional GPU extras are missing (expected on
# CPU), and TransformerConfig warns about its own default cuda_graph_scope; these exact
# notices are silenced (nothing else is).
warnings.filterwarnings("ignore", message=r".*(Apex is not installed|Transformer Engine and Apex are not installed).*")
warnings.filterwarnings("ignore", message=r"full scope is deprecated\. Use empty cuda_graph_scope", category=UserWarning)
