"""The optimisation loop, independent of ComfyUI.

``Trainer`` owns the optimizer (one parameter group per kind of parameter, each with
its own learning rate), warm-up, gradient accumulation and clipping, the random
stream of every step (so a run is reproducible bit for bit on the CPU), the loss
history, and resumable state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .config import TrainConfig, learning_rate_factor

LossFn = Callable[[int, int, torch.Generator], torch.Tensor]


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """A generator for one micro-step that depends only on (seed, step, micro)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 131 + micro) % (2**63))


@dataclass
class Trainer:
    config: TrainConfig
    groups: dict[str, list[torch.nn.Parameter]]
    """Parameters by group: "spectral", "1d", "text", "full", "token" (empty groups are dropped)."""
    loss_fn: LossFn
    """Loss of one micro-batch: ``loss_fn(step, micro, generator)``."""
    step: int = 0
    losses: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        lrs = {
            "spectral": self.config.lr_spectral,
            "1d": self.config.lr_1d,
            "text": self.config.lr_text,
            "full": self.config.lr_full,
            "token": self.config.lr_token,
        }
        param_groups = [
            {"params": params, "lr": lrs[name], "base_lr": lrs[name], "name": name} for name, params in self.groups.items() if params
        ]
        if not param_groups:
            raise ValueError("nothing to train: the chosen layers contain no weights")
        optimizer_cls = torch.optim.AdamW if self.config.optimizer == "AdamW" else torch.optim.Adam
        self.optimizer = optimizer_cls(param_groups, weight_decay=self.config.weight_decay, foreach=False)
        self.parameters = [p for group in param_groups for p in group["params"]]

    def run(self, until: int | None = None, on_step: Callable[[int, float], None] | None = None) -> None:
        """Train up to optimizer step ``until`` (default: ``config.steps``).

        ``on_step(step, loss)`` runs after every optimizer step (1-based step), e.g. to
        report progress, preview, save, or raise to cancel.
        """
        until = self.config.steps if until is None else until
        accumulation = self.config.grad_accumulation
        while self.step < until:
            factor = learning_rate_factor(self.step, self.config.warmup_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            total = 0.0
            for micro in range(accumulation):
                loss = self.loss_fn(self.step, micro, step_generator(self.config.seed, self.step, micro))
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"the loss became {float(loss.detach())} at step {self.step + 1}; lower the learning rates or enable gradient clipping"
                    )
                (loss / accumulation).backward()
                total += float(loss.detach()) / accumulation
            if self.config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.parameters, self.config.max_grad_norm, foreach=False)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.losses.append(total)
            if on_step is not None:
                on_step(self.step, total)

    # -- resume -----------------------------------------------------------------------------

    def state_tensors(self, names: dict[int, str]) -> dict[str, torch.Tensor]:
        """Everything a resumed run needs besides the config, as named tensors.

        ``names``: id(param) → stable name. Per parameter: its float32 value
        (``<name>.value``; the shift file may hold it rounded to fp16) and the optimizer's
        moments and step. Nothing else is needed to continue bit for bit: every step's
        random stream (noise, timesteps, data order, flips) comes from
        :func:`step_generator` of ``(seed, step, micro)``, and the learning-rate schedule
        from the step.
        """
        out = {}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                name = names[id(p)]
                out[f"{name}.value"] = p.detach().to(torch.float32).clone()
                for k, v in self.optimizer.state.get(p, {}).items():
                    out[f"{name}.{k}"] = v.detach().clone() if torch.is_tensor(v) else torch.tensor(float(v))
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], names: dict[int, str]) -> tuple[int, int]:
        """Restore what :meth:`state_tensors` saved; returns (parameters with optimizer
        state restored, parameters whose float32 value was restored)."""
        moments = values = 0
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                name = names[id(p)]
                value = tensors.get(f"{name}.value")
                if value is not None and value.shape == p.shape:
                    with torch.no_grad():
                        p.copy_(value.to(p.device, p.dtype))
                    values += 1
                state = {}
                for key in ("step", "exp_avg", "exp_avg_sq"):
                    t = tensors.get(f"{name}.{key}")
                    if t is None:
                        continue
                    if key != "step" and t.shape != p.shape:
                        continue
                    state[key] = t.to(p.device, torch.float32).clone()
                if len(state) == 3:
                    self.optimizer.state[p] = state
                    moments += 1
        return moments, values
