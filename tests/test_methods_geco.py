"""GECO end to end: a learnable block mask sparsified under a task-loss constraint settles at it.

Post-training sparsification as GECO (Rezende & Viola, 2018) frames it: minimise the mask's L0
penalty subject to ``task_loss <= tolerance``, where the task is to reproduce the output of the
full (all blocks open) attention. Blocks carry graded attention mass (block-level biases on q and
k), so closing blocks raises the task loss step by step; the run must stop where the constraint
binds: not every block open (the task loss would be 0), not every block closed (the task loss
would be far above the tolerance).
"""

from __future__ import annotations

import pytest
import torch

from dilated_sparse.methods import GECO, LearnableBlockMask, block_gated_attention

pytestmark = pytest.mark.usefixtures("single_thread")

S, BLOCK, D = 256, 16, 16
NB = S // BLOCK
TOL = 0.02


def _task() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, S, 1, D, generator=g) for _ in range(3))
    bias = torch.randn(NB, D, generator=g)
    blocks = torch.arange(S) // BLOCK
    q = q + bias[blocks].view(1, S, 1, D)
    k = k + bias[torch.randperm(NB, generator=g)][blocks].view(1, S, 1, D)
    with torch.no_grad():
        target = block_gated_attention(q, k, v, torch.ones(1, NB, NB), BLOCK)
    return q, k, v, target


def _train(geco: GECO, steps: int = 300) -> tuple[LearnableBlockMask, float, list[float]]:
    torch.manual_seed(0)  # the gates' Concrete noise
    q, k, v, target = _task()
    # max_seq_len twice the sequence: the L0 penalty and the density must cover the gates in use only
    mask = LearnableBlockMask(1, 2 * S, BLOCK, init_keep=0.9, temperature=0.5)
    opt = torch.optim.Adam(mask.parameters(), lr=0.1)
    lambdas = []
    for _ in range(steps):
        task = (mask(q, k, v) - target).pow(2).mean()
        loss = geco(task, mask.l0_loss())
        opt.zero_grad()
        loss.backward()
        opt.step()
        lambdas.append(float(geco.lagrange_multiplier))
    mask.eval()
    with torch.no_grad():
        final = float((mask(q, k, v) - target).pow(2).mean())
    return mask, final, lambdas


def test_task_brackets_the_tolerance():
    """The tolerance is reachable only with part of the blocks: all closed is far above it."""
    q, k, v, target = _task()
    closed = float(target.pow(2).mean())  # every gate closed: output 0
    diagonal = block_gated_attention(q, k, v, torch.eye(NB).view(1, NB, NB), BLOCK)
    assert closed > 3 * TOL and float((diagonal - target).pow(2).mean()) > 3 * TOL


def test_geco_sparsifies_a_block_mask_to_the_constraint():
    geco = GECO(tolerance=TOL)
    mask, final, lambdas = _train(geco)
    assert 0.5 * TOL <= final <= 1.25 * TOL, f"eval task loss {final:.4f} vs tolerance {TOL}"
    density = mask.density()
    assert 0.05 < density < 0.6, f"density {density:.3f}: the mask should settle between closed and open"
    open_blocks = mask.logits.detach()[0, :NB, :NB] > 0
    assert open_blocks.any(dim=-1).all()  # no query block row left without a key block
    assert abs(float(geco.constraint_ma)) < 0.5 * TOL  # the moving average of C sits at the boundary
    assert max(lambdas) > 2.0  # the multiplier had to grow to stop the sparsity term ...
    assert all(0 < lam < 1e3 for lam in lambdas)  # ... and stayed finite
    # the L0 penalty and the density cover the gates in use, not the max_seq_len grid
    assert mask.used_blocks == (NB, NB)
    assert density == pytest.approx(mask.density(S, S))
    assert mask.l0_loss().item() == pytest.approx(torch.sigmoid(mask.logits[:, :NB, :NB]).mean().item())
    assert (mask.logits.detach()[:, NB:, :] == mask.logits.detach()[0, NB, 0]).all()  # untouched


def test_slow_multiplier_overshoots_past_the_constraint():
    """Why ``lambda_lr`` defaults to 1: at 0.1 the multiplier lags Adam and the mask overshoots."""
    _, final, lambdas = _train(GECO(tolerance=TOL, lambda_lr=0.1))
    assert final > 1.25 * TOL and max(lambdas) < 2.0
