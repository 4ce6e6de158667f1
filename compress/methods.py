"""The built-in methods. Each module below registers its methods (``compress.configs.register_method``)
beside its handler; importing this module makes them all known to api, CLI and recipes.

    rtn, gptq           compress/quant/apply.py
    kv_cache            compress/kv/attention.py
    magnitude, wanda,   compress/pruning/apply.py
    sparsegpt
    dsnot               compress/pruning/dsnot.py
    gblm                compress/pruning/gblm.py
    structured          compress/pruning/structured.py
    minitron            compress/pruning/minitron.py
    adapt               compress/pruning/adapt.py
    expert_prune        compress/pruning/experts.py
    lora                compress/lora/train.py
    distill             compress/distillation/apply.py
    smoothquant, awq    compress/smoothing/apply.py
    rotate              compress/rotation/apply.py

A method of your own registers the same way, from your code: ``register_method(MyConfig, my_handler,
area="quantize")``; see docs/methods.md.
"""

from .distillation import apply as _distillation  # noqa: F401
from .kv import attention as _kv  # noqa: F401
from .lora import train as _lora  # noqa: F401
from .pruning import apply as _pruning  # noqa: F401
from .pruning import dsnot as _dsnot  # noqa: F401
from .pruning import gblm as _gblm  # noqa: F401
from .pruning import adapt as _adapt  # noqa: F401
from .pruning import experts as _experts  # noqa: F401
from .pruning import minitron as _minitron  # noqa: F401
from .pruning import structured as _structured  # noqa: F401
from .quant import apply as _quant  # noqa: F401
from .rotation import apply as _rotation  # noqa: F401
from .smoothing import apply as _smoothing  # noqa: F401
