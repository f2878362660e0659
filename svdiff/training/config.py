"""Training options, each documented and validated where it is declared."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .subsets import CUSTOM, SUBSETS

OPTIMIZERS = ("AdamW", "Adam")
METHODS = ("spectral", "full")
"""What is trained: spectral shifts (SVDiff), or full K/V weight deltas (Custom Diffusion)."""


@dataclass
class TrainConfig:
    steps: int = 500
    """Optimizer steps (the paper trains 500–1000 with prior preservation)."""
    batch_size: int = 1
    """Instance examples per micro-batch (plus as many prior examples when λ > 0)."""
    grad_accumulation: int = 1
    """Micro-batches whose gradients are summed before each optimizer step."""
    lr_spectral: float = 1e-3
    """Learning rate of the UNet spectral shifts (paper: 1e-3, 1000× full fine-tuning)."""
    lr_1d: float = 1e-6
    """Learning rate of the elementwise 1-D deltas (paper: 1e-6; larger adapts faster)."""
    lr_text: float = 1e-3
    """Learning rate of the text-encoder spectral shifts."""
    optimizer: str = "AdamW"
    weight_decay: float = 0.0
    """Decoupled weight decay on every group (0: none on δ, the default)."""
    warmup_steps: int = 0
    """Linear warm-up of every learning rate from 0; constant afterwards."""
    max_grad_norm: float = 1.0
    """Gradient clipping on the global norm; 0 disables it."""
    prior_weight: float = 1.0
    """λ of eq. 3: weight of the prior-preservation loss; 0 disables it."""
    subset: str = "UNet"
    """A Table 1 subset, or "custom patterns only"."""
    patterns: str = ""
    """Extra layers by name (substring, glob or re:regex, comma separated)."""
    train_text_encoder: bool = False
    rank: int = 0
    """Shift only the top-k singular values of each 2-D/4-D weight (appendix E.1); 0 = all."""
    seed: int = 0
    flip: bool = True
    """Random horizontal flips of instance images."""
    method: str = "spectral"
    """"spectral": shifts on ``subset``; "full": full-weight deltas on cross-attention K/V only."""
    lr_full: float = 1e-5
    """Learning rate of the full K/V deltas (Custom Diffusion: 1e-5 per image of the batch)."""
    modifier_token: str = ""
    """A placeholder word in the captions (e.g. ``<new1>``) trained as a new token embedding; "" for none."""
    initializer_token: str = "42170"
    """Token id (or single-token word) whose embedding the modifier starts from (reference: 42170, the piece "ktn")."""
    lr_token: float = 1e-5
    """Learning rate of the modifier token's embedding."""
    labels: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    """What a node calls each field it sets (``{"lr_spectral": "learning_rate"}``): messages
    name the input the user sees. Not part of :meth:`summary`."""

    def label(self, name: str) -> str:
        return self.labels.get(name, name)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accumulation"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{self.label(name)} is {value}; it must be a whole number of at least 1")
        for name in ("lr_spectral", "lr_1d", "lr_text", "lr_full", "lr_token"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(
                    f"{self.label(name)} is {value}; learning rates must be positive (the paper uses 1e-3 for shifts, 1e-6 for 1-D)"
                )
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer '{self.optimizer}' is not supported; use one of {', '.join(OPTIMIZERS)}")
        for name in ("weight_decay", "max_grad_norm", "prior_weight"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{self.label(name)} is {value}; it must be a finite number ≥ 0")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps is {self.warmup_steps}; it must be ≥ 0")
        if self.rank < 0:
            raise ValueError(f"rank is {self.rank}; use 0 for all singular values or a positive limit")
        if self.method not in METHODS:
            raise ValueError(f"method '{self.method}' is unknown; use one of {', '.join(METHODS)}")
        if self.modifier_token.strip() != self.modifier_token or " " in self.modifier_token:
            raise ValueError(f"modifier_token '{self.modifier_token}' must be one word without spaces, e.g. <new1>")
        if self.modifier_token and (not self.initializer_token.strip() or " " in self.initializer_token.strip()):
            raise ValueError(
                f"initializer_token '{self.initializer_token}' must be one word or a token id, e.g. 42170 (the reference's 'ktn')"
            )
        if self.subset != CUSTOM and self.subset not in SUBSETS:
            raise ValueError(f"{self.label('subset')} '{self.subset}' is unknown; choose one of {', '.join([*SUBSETS, CUSTOM])}")
        if self.subset == CUSTOM and not self.patterns.strip() and not self.train_text_encoder:
            raise ValueError(f"{self.label('subset')} is 'custom patterns only' but name_patterns is empty; write at least one pattern")

    def summary(self) -> dict:
        summary = asdict(self)
        del summary["labels"]
        return summary


def learning_rate_factor(step: int, warmup_steps: int) -> float:
    """Multiplier of every learning rate at optimizer step ``step`` (0-based)."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


@dataclass
class AttentionConfig:
    """Cross-attention regularisers (see :mod:`svdiff.training.attention`)."""

    unmix_weight: float = 0.0
    """Weight of the unmix loss on Cut-Mix-Unmix collages (paper Fig. 3b); 0 disables it."""
    subject_weight: float = 0.0
    """Weight of the single-subject loss of eq. 10 (appendix D.1); 0 disables it."""
    threshold: float = 0.5
    """The subject mask is where the class word's attention reaches this fraction of its peak."""
    class_word: str = ""
    """Class word of a single-subject dataset for eq. 10 ("dog"); Cut-Mix-Unmix subjects know theirs."""

    def __post_init__(self) -> None:
        for name in ("unmix_weight", "subject_weight"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} is {value}; it must be a finite number ≥ 0 (0 disables it)")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold is {self.threshold}; use a fraction of the class word's peak attention in (0, 1), e.g. 0.5")
        if self.unmix_weight == 0 and self.subject_weight == 0:
            raise ValueError("both unmix_weight and subject_weight are 0; set one above 0, or disconnect the attention input")

    def active(self) -> bool:
        return self.unmix_weight > 0 or self.subject_weight > 0
