"""Rotations before quantization: QuaRot / SpinQuant-style orthogonal transforms (docs/rotation.md).

``config.py`` the config, ``apply.py`` the offline folds (R1 residual stream, R2 per head, R4's
weight side) and the registration, ``compress/transforms.py`` the run-time input transform (R4's activation side)
that survives quantization and export.
"""

from .config import RotationConfig

__all__ = ["RotationConfig"]
