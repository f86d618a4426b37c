"""GECO: constrained optimisation for post-training sparsification of attention.

Rezende & Viola, "Taming VAEs" (2018) introduce GECO (Generalized ELBO with Constrained
Optimization): minimise an objective subject to ``C <= 0`` with a Lagrange multiplier that is
updated from a moving average of the constraint. Used here as a post-training sparsity
regulariser: minimise a sparsity penalty (e.g. :meth:`LearnableBlockMask.l0_loss`, attention
entropy, kept-``k``) subject to ``task_loss <= tolerance`` (the task quality of the trained model
must not degrade by more than the tolerance). The multiplier grows while the task loss is above
the tolerance (quality first) and shrinks while it is below (sparsity takes over).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["GECO"]


class GECO(nn.Module):
    """GECO Lagrangian for sparsity under a task-loss constraint (Rezende & Viola, 2018).

    ``loss = sparsity_loss + lambda * C_hat`` with ``C = task_loss - tolerance`` and ``C_hat`` the
    value of the moving average ``C_ma`` carrying the gradient of ``C`` (``C + (C_ma - C).detach()``).
    After each call (in training mode) ``lambda <- clamp(lambda * exp(lambda_lr * C_ma))``: the
    multiplier grows while the task loss is above the tolerance and shrinks below it, as in
    Rezende & Viola's Algorithm 1 (there the objective is the KL and ``C`` the reconstruction error
    minus its tolerance; here the objective is the sparsity penalty).

    ``lambda_lr`` is per unit of the task loss: ``lambda`` changes by a factor
    ``exp(lambda_lr * C_ma)`` per step. The multiplier has to outpace the optimiser of the gates
    (Adam moves every logit by about its learning rate per step, whatever the gradient scale), or
    the sparsity term empties the mask before ``lambda`` has grown enough to stop it. With task
    losses of order 0.01 to 1 and violations a few percent of the loss, ``lambda_lr = 1`` reacts
    within tens of steps; 0.1 (the default before) needed hundreds to thousands, which in a short
    run reads as "GECO closes every block". Scale it up for losses much smaller than 1 (or
    normalise the task loss), down if ``lambda`` oscillates.

    Args:
        tolerance: the task loss allowed (``kappa``); e.g. the trained model's loss plus a margin.
        ema: moving-average factor of the constraint, in ``[0, 1)``.
        lambda_init: initial multiplier (> 0).
        lambda_lr: multiplicative update rate of the multiplier (> 0, per unit of task loss).
        lambda_min, lambda_max: bounds of the multiplier.
    """

    lagrange_multiplier: torch.Tensor
    constraint_ma: torch.Tensor

    def __init__(self, tolerance: float, *, ema: float = 0.9, lambda_init: float = 1.0,
                 lambda_lr: float = 1.0, lambda_min: float = 1e-6, lambda_max: float = 1e6) -> None:
        super().__init__()
        if not 0 <= ema < 1:
            raise ValueError(f"ema must be in [0, 1), got {ema}")
        if not lambda_lr > 0:
            raise ValueError(f"lambda_lr must be > 0, got {lambda_lr}")
        if not (0 < lambda_min <= lambda_init <= lambda_max):
            raise ValueError("need 0 < lambda_min <= lambda_init <= lambda_max")
        self.tolerance = float(tolerance)
        self.ema = float(ema)
        self.lambda_lr = float(lambda_lr)
        self.lambda_min, self.lambda_max = float(lambda_min), float(lambda_max)
        self.register_buffer("lagrange_multiplier", torch.tensor(float(lambda_init)))
        self.register_buffer("constraint_ma", torch.tensor(float("nan")))

    def forward(self, task_loss: torch.Tensor, sparsity_loss: torch.Tensor) -> torch.Tensor:
        """The scalar loss to minimise; updates the multiplier in training mode."""
        constraint = task_loss - self.tolerance
        value = constraint.detach().to(self.constraint_ma.dtype)
        # the first step (moving average still NaN) starts it at the value; no host sync to decide
        ma = torch.where(torch.isnan(self.constraint_ma), value,
                         self.ema * self.constraint_ma + (1 - self.ema) * value)
        c_hat = constraint + (ma.to(constraint.dtype) - constraint).detach()
        # a copy: the buffer is updated in place below, after the loss has used its old value
        loss = sparsity_loss + self.lagrange_multiplier.detach().clone().to(constraint.dtype) * c_hat
        if self.training:
            with torch.no_grad():
                self.constraint_ma.copy_(ma)
                new = self.lagrange_multiplier * torch.exp(self.lambda_lr * ma)
                self.lagrange_multiplier.copy_(new.clamp(self.lambda_min, self.lambda_max))
        return loss

    def satisfied(self) -> bool:
        """Whether the moving average of the constraint is <= 0."""
        return bool(self.constraint_ma <= 0)
