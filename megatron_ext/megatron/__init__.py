"""Everything that touches megatron-core lives in this package."""
import warnings

# megatron-core announces at import that the optional GPU extras are missing; on
# CPU that is expected, so these exact notices are silenced (nothing else is).
warnings.filterwarnings("ignore", message=r".*(Apex is not installed|Transformer Engine and Apex are not installed).*")
