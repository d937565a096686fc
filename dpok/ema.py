"""An exponential moving average of the policy's trainable weights (``--ema-decay``).

diffusers' :class:`~diffusers.training_utils.EMAModel` keeps the average; it is updated after
every optimizer step of the policy (a post-step hook on the optimizer, so no algorithm needs to
know about it; a step skipped for a non-finite gradient is no step). Its decay warms up as
diffusers' default does: the first step copies the weights, step n + 1 uses
``min(decay, (1 + n) / (10 + n))``, so the starting weights do not dominate. Its state goes into
every checkpoint, so a resumed run has the same average, bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from .adapter import ema_average


class PolicyEMA:
    """The EMA of ``params`` (the policy's trainable parameters), stepped with ``optimizer``."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float, optimizer: torch.optim.Optimizer) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"--ema-decay must be in (0, 1) (got {decay})")
        self.params = list(params)
        self.average = ema_average(self.params, decay)
        self._hook = optimizer.register_step_post_hook(lambda *_: self.average.step(self.params))

    @property
    def steps(self) -> int:
        """Optimizer steps averaged so far."""
        return int(self.average.optimization_step)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Within this block the parameters hold the EMA weights; the raw ones are restored after."""
        self.average.store(self.params)
        self.average.copy_to(self.params)
        try:
            yield
        finally:
            self.average.restore(self.params)

    def state_dict(self) -> dict[str, Any]:
        """The average (tensors) and its counters, for a checkpoint."""
        state = self.average.state_dict()
        return {**state, "shadow_params": [p.detach().cpu().clone() for p in state["shadow_params"]]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the tensors onto the parameters' device)."""
        shadow = state["shadow_params"]
        if len(shadow) != len(self.params) or any(s.shape != p.shape for s, p in zip(shadow, self.params)):
            raise ValueError("the checkpoint's EMA weights do not match this model's trainable parameters; resume "
                             "with the same --model, --finetune and LoRA settings")
        self.average.load_state_dict({**state, "min_decay": float(state["min_decay"]),
                                      "shadow_params": [s.to(p.device, p.dtype) for s, p in zip(shadow, self.params)]})
