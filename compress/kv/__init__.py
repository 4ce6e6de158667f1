"""KV-cache quantization: the keys and values stored while generating, in int8/4/2 (KIVI) or FP8.

- ``config.py``     KVCacheConfig (method "kv_cache") and what a cache of that kind costs per token
- ``quant.py``      the storage layout: pure functions on tensors (quantize, pack, dequantize), QuantizedKV
- ``model.py``      what a model carries: its KV-cache config and calibrated fp8 scale buffers
- ``cache.py``      QuantizedKVCache: a ``transformers.Cache`` holding the quantized past (full and
                    sliding-window layers)
- ``attention.py``  the pass on a model (config, FP8 scale calibration), ``kv_cache(model)`` and the
                    ``compress_kv`` attention function that decodes on the quantized bytes
- ``swiftkv.py``    SwiftKV (SingleInputKV + AcrossKV): later layers' KV from one earlier layer's
                    output, prefill FLOP / KV byte accounting, scoring after a prompt
"""

from .attention import apply_kv_cache, kv_cache
from .cache import QuantizedKVCache
from .config import KV_SCHEMES, KVCacheConfig
from .swiftkv import SwiftKVConfig, swiftkv
from .model import CONFIG_KEY, attention_modules, kv_config_of, kv_scales_of, set_kv_scales

__all__ = ["CONFIG_KEY", "KVCacheConfig", "KV_SCHEMES", "QuantizedKVCache", "SwiftKVConfig", "apply_kv_cache", "attention_modules", "kv_cache",
           "kv_config_of", "kv_scales_of", "set_kv_scales", "swiftkv"]
