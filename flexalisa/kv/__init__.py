"""Token-level tiered KV store (GPU, CPU, recompute tiers) and group-wise INT8/INT4 quantization."""

from flexalisa.kv.config import KVCounters, KVStoreConfig
from flexalisa.kv.quant import QTensor, dequantize, quantize
from flexalisa.kv.selection import FetchedKV, RecomputeFn, TierMasks
from flexalisa.kv.store import TieredKVStore

__all__ = [
    "FetchedKV",
    "KVCounters",
    "KVStoreConfig",
    "QTensor",
    "RecomputeFn",
    "TierMasks",
    "TieredKVStore",
    "dequantize",
    "quantize",
]
