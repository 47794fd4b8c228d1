"""jax_paged_attn: paged attention for JAX on NVIDIA GPUs (CUDA kernels behind the XLA FFI),
with a CPU FFI path and a pure-jnp reference."""

from jax import export as _export

from . import _registry, reference, sharding
from .api import append_kv, paged_decode, paged_prefill
from .metadata import check_metadata
from .ragged import ragged_append_kv, ragged_paged_attention
from .views import StridedView, split_qkv

# Pass as `jax.export.export(fn, disabled_checks=EXPORT_DISABLED_CHECKS)`: our custom calls
# are not on JAX's list of stable custom calls, so exporting them is an explicit opt-in.
EXPORT_DISABLED_CHECKS = [_export.DisabledSafetyCheck.custom_call(name)
                          for name in _registry.EXPORTED_CUSTOM_CALLS]

# Handlers are registered at import, so that an exported module deserialized in a fresh
# process finds them before any op has been traced.
_registry.register_if_built()

__all__ = ["paged_decode", "paged_prefill", "append_kv", "StridedView", "split_qkv",
           "check_metadata", "reference", "EXPORT_DISABLED_CHECKS", "ragged_paged_attention",
           "ragged_append_kv", "sharding"]
__version__ = "0.1.0"
