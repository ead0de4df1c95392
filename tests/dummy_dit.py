"""A dummy DiT with exact arithmetic.

Each block is a residual module ``x + gain * x`` and the head doubles the last block's output, so
with ``hidden_states = s_t * ones`` every cache point is ``s_t`` times a known constant: tests can
predict every decision and every cached output by hand.
"""

from __future__ import annotations

import torch
from torch import nn

GAINS = (1.0, 0.5, 0.25)


class DummyBlock(nn.Module):
    def __init__(self, gain: float):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(gain))

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        # temb * 0 keeps the timestep path alive in the graph without changing the arithmetic.
        return hidden_states + self.gain * hidden_states + temb * 0.0


class DummyDiT(nn.Module):
    def __init__(self, gains: tuple[float, ...] = GAINS):
        super().__init__()
        self.blocks = nn.ModuleList(DummyBlock(g) for g in gains)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        temb = timestep.reshape(-1, 1, 1)  # [B, 1, 1]
        for block in self.blocks:
            hidden_states = block(hidden_states, temb)
        return hidden_states * 2.0


def output_scale(gains: tuple[float, ...] = GAINS) -> float:
    """The model output is ``s * output_scale()`` for ``hidden_states = s * ones``."""
    scale = 2.0
    for g in gains:
        scale *= 1.0 + g
    return scale


class NotADiT(nn.Module):
    """No repeated top-level blocks: nothing to cache."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden_states) * timestep.reshape(-1, 1, 1)
