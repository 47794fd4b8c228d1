"""jax_paged_attn: paged attention for JAX on NVIDIA GPUs (CUDA kernels behind the XLA FFI),
with a CPU FFI path and a pure-jnp reference."""

from . import reference
from .api import append_kv, paged_decode, paged_prefill
from .metadata import check_metadata
from .views import StridedView, split_qkv

__all__ = ["paged_decode", "paged_prefill", "append_kv", "StridedView", "split_qkv",
           "check_metadata", "reference"]
__version__ = "0.1.0"
