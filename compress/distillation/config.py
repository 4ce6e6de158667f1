"""DistillConfig: LoRA retraining (every LoRAConfig field) with the uncompressed model as teacher."""

from __future__ import annotations

import dataclasses
from typing import Literal

from ..errors import ConfigError
from ..lora.adapters import LoRAConfig


@dataclasses.dataclass
class DistillConfig(LoRAConfig):
    """Train the compressed model's LoRA adapters (plus norms and biases) to match its teacher.

    The loss of a batch is a weighted sum (weights of 0 switch a term off; formulas in
    ``losses.py`` and docs/distillation.md)::

        kl * T^2 KL(p_T || q_T)  +  reverse_kl * T^2 KL(q_T || p_T)  +  lm * CE(text)
        + hidden * mean over hidden_layers of ||h_s - h_t||^2 / mean(h_t^2)

    with p_T, q_T the teacher's and student's next-token distributions at temperature T.

    learning_rate:  2e-3 here, twice LoRA retraining's default: with the teacher's soft targets the
                    higher rate trained faster on SmolLM2 2:4 (docs/distillation.md, "Results").
    kl:             weight of the forward KL (the usual knowledge-distillation loss).
    reverse_kl:     weight of the reverse KL (mode-seeking); needs the full teacher distribution,
                    so ``teacher: model`` and ``top_k: null``.
    lm:             weight of the plain next-token cross-entropy on the training text. The teacher
                    never saw this text's domain; mixing in the text's own labels lets the student
                    adapt to it as LM retraining does, while the KL term carries the teacher's
                    full distribution (what LM retraining cannot see).
    hidden:         weight of the hidden-state term on ``hidden_layers``.
    hidden_layers:  decoder layers whose outputs are matched (0-based; negative counts from the
                    end); null = every layer. With ``teacher: cache`` each one is stored for
                    every training window (samples x seqlen x hidden 16-bit values).
    temperature:    T, softening both distributions (T^2 keeps the gradient scale).
    top_k:          match the teacher's k most likely tokens plus one bucket for the rest of its
                    mass (memory-light: a cached teacher stores k values and indices per token);
                    null = the whole vocabulary (``teacher: model`` only).
    teacher:        "cache": the teacher's targets (top-k logits and the chosen hidden states) are
                    computed once, before the recipe's first lossy pass, and kept on disk, so the
                    teacher and the student are never in memory together. "model": the teacher
                    runs beside the student at every step (offloaded to the CPU, streamed layer by
                    layer to the GPU); needed for full-vocabulary and reverse KL.
    kl_tokens:      which positions the KL terms average over: "all", or "teacher_better": only
                    where the teacher gives the text's actual next token a higher probability than
                    the student does (a label outside a cached teacher's top_k counts as not
                    better). Where the student already predicts the text better than its teacher
                    (the teacher never saw this domain), the KL would pull it back; there the LM
                    term alone trains it.
    quantized:      for packed (quantized) layers, which cannot take a merge: "correction" keeps
                    the adapters as a separate low-rank correction (exported as a PEFT adapter
                    beside the quantized checkpoint); "requantize" folds them into the dequantized
                    weights and rounds those onto the layer's own format again (one checkpoint, no
                    adapter; the update mostly survives only where it exceeds half a grid step).
    """

    method = "distill"
    learning_rate: float = 2e-3         # LoRA's 1e-3 doubled: measured better with soft targets (docs/distillation.md)
    kl: float = 1.0
    reverse_kl: float = 0.0
    lm: float = 1.0
    hidden: float = 0.0
    hidden_layers: list[int] | None = None
    temperature: float = 1.0
    top_k: int | None = 64
    teacher: Literal["cache", "model"] = "cache"
    kl_tokens: Literal["all", "teacher_better"] = "all"
    quantized: Literal["correction", "requantize"] = "correction"

    def validate(self) -> None:
        super().validate()
        weights = {"kl": self.kl, "reverse_kl": self.reverse_kl, "lm": self.lm, "hidden": self.hidden}
        negative = [k for k, v in weights.items() if v < 0]
        if negative:
            raise ConfigError(f"loss weights must be >= 0, got {', '.join(f'{k}={weights[k]}' for k in negative)}")
        if self.kl == self.reverse_kl == self.hidden == 0:
            raise ConfigError("kl, reverse_kl and hidden are all 0: nothing is distilled (that is LoRA retraining: "
                              "use method 'lora'); give kl (e.g. 1.0) a weight")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be positive (1.0 = the models' own distributions), got "
                              f"{self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k must be a positive number of tokens (e.g. 64) or null (full vocabulary), "
                              f"got {self.top_k}")
        if self.teacher not in ("cache", "model"):
            raise ConfigError(f"teacher must be 'cache' or 'model', got {self.teacher!r}")
        if self.teacher == "cache" and self.top_k is None and (self.kl or self.reverse_kl):
            raise ConfigError("a cached teacher keeps only its top_k logits per token; set top_k (e.g. 64) or "
                              "teacher: model for the full-vocabulary KL")
        if self.reverse_kl and (self.teacher != "model" or self.top_k is not None):
            raise ConfigError("reverse_kl needs the teacher's whole distribution: set teacher: model and top_k: null")
        if self.kl_tokens not in ("all", "teacher_better"):
            raise ConfigError(f"kl_tokens must be 'all' or 'teacher_better', got {self.kl_tokens!r}")
        if self.quantized not in ("correction", "requantize"):
            raise ConfigError(f"quantized must be 'correction' or 'requantize', got {self.quantized!r}")

    def describe(self) -> str:
        terms = [f"{k} {v:g}" for k, v in (("kl", self.kl), ("rkl", self.reverse_kl), ("lm", self.lm),
                                            ("hidden", self.hidden)) if v]
        k = f" top{self.top_k}" if self.top_k and (self.kl or self.reverse_kl) else ""
        return f"r{self.rank} {'+'.join(terms)}{k} T{self.temperature:g}"
