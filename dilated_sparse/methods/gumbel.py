"""Gumbel-based sparse attention: straight-through Gumbel-softmax and learnable Bernoulli masks.

* :func:`gumbel_softmax_attention` -- each query samples (hard, one key) or softly weights keys
  with the Gumbel-softmax of Jang, Gu & Poole, "Categorical Reparameterization with
  Gumbel-Softmax" (ICLR 2017) / Maddison, Mnih & Teh, "The Concrete Distribution" (ICLR 2017);
  the hard version uses the straight-through estimator. :class:`GumbelTemperatureSchedule`
  anneals the temperature (Jang et al. anneal it exponentially).
* :class:`LearnableBlockMask` -- a learnable on/off gate per (head, query block, key block),
  sampled from the binary Concrete (relaxed Bernoulli) with a straight-through hard threshold and
  trained with an L0-style penalty (the expected fraction of open gates), after Louizos, Welling
  & Kingma, "Learning Sparse Neural Networks through L0 Regularization" (ICLR 2018). In eval mode
  the gates are deterministic and :meth:`LearnableBlockMask.to_layout` turns them into a
  :class:`~dilated_sparse.BlockSparseLayout` for the block-sparse kernel.
* :func:`block_gated_attention` -- softmax attention re-weighted by block gates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..layout import BlockSparseLayout, normalize_block_size
from ._common import RowInfo, check_qkv, chunk_seed, masked_softmax, rowwise_attention

__all__ = [
    "GumbelTemperatureSchedule",
    "LearnableBlockMask",
    "block_gated_attention",
    "gumbel_softmax_attention",
]


def _gumbel_noise(shape: torch.Size, seed: int, like: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator(device=like.device)
    generator.manual_seed(seed)
    u = torch.rand(shape, generator=generator, device=like.device, dtype=like.dtype)
    tiny = torch.finfo(like.dtype).tiny
    return -torch.log(-torch.log(u.clamp(tiny, 1.0 - 1e-7)))


def gumbel_softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    temperature: float = 1.0,
    hard: bool = True,
    *,
    noise: bool = True,
    generator: torch.Generator | None = None,
    causal: bool = False,
    scale: float | None = None,
    key_lengths: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    layout: BlockSparseLayout | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Gumbel-softmax attention (Jang et al., ICLR 2017; Maddison et al., ICLR 2017).

    ``y = softmax((s + g) / temperature)`` over the allowed keys with Gumbel noise ``g`` (off with
    ``noise=False``). ``hard=True`` returns the one-hot of the arg max in the forward pass and the
    gradient of the soft ``y`` (straight-through): each query then reads exactly one value.
    Chunked over queries (memory ``O(chunk x Sk)``); the noise of a chunk comes from a seed drawn
    from ``generator`` (or the global RNG), so the recomputation in the backward pass reuses it.

    Returns:
        ``[B, Sq, H, D]``; rows without an allowed key are 0.
    """
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    seeds: dict[int, int] = {}

    def normalize(scores: torch.Tensor, mask: torch.Tensor, info: RowInfo) -> torch.Tensor:
        logits = scores
        if noise:
            if info.chunk not in seeds:
                seeds[info.chunk] = chunk_seed(generator, scores.device)
            logits = scores + _gumbel_noise(scores.shape, seeds[info.chunk], scores)
        soft = masked_softmax(logits / temperature, mask)
        if not hard:
            return soft
        index = soft.argmax(dim=-1, keepdim=True)
        one_hot = torch.zeros_like(soft).scatter(-1, index, 1.0) * mask.any(dim=-1, keepdim=True)
        return one_hot - soft.detach() + soft

    return rowwise_attention(
        q, k, v, normalize, layout=layout, scale=scale, causal=causal, key_lengths=key_lengths,
        key_padding_mask=key_padding_mask, chunk_size=chunk_size,
    )


class GumbelTemperatureSchedule:
    """Temperature annealing for Gumbel-softmax (Jang et al., ICLR 2017 anneal exponentially).

    ``value(step)`` goes from ``initial`` at step 0 to ``final`` at ``total_steps`` (and stays
    there): ``"exponential"`` (geometric), ``"linear"`` or ``"cosine"``. Call :meth:`step` once
    per training step; :attr:`temperature` is the current value.
    """

    def __init__(self, initial: float = 1.0, final: float = 0.1, total_steps: int = 1000,
                 mode: str = "exponential") -> None:
        if not (initial > 0 and final > 0):
            raise ValueError(f"temperatures must be > 0, got initial={initial}, final={final}")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
        if mode not in ("exponential", "linear", "cosine"):
            raise ValueError(f"mode must be 'exponential', 'linear' or 'cosine', got {mode!r}")
        self.initial, self.final, self.total_steps, self.mode = float(initial), float(final), total_steps, mode
        self.current_step = 0

    def value(self, step: int) -> float:
        """Temperature at ``step``."""
        t = min(max(step, 0), self.total_steps) / self.total_steps
        if self.mode == "exponential":
            return self.initial * (self.final / self.initial) ** t
        if self.mode == "linear":
            return self.initial + (self.final - self.initial) * t
        return self.final + 0.5 * (self.initial - self.final) * (1 + math.cos(math.pi * t))

    @property
    def temperature(self) -> float:
        """Temperature at the current step."""
        return self.value(self.current_step)

    def step(self) -> float:
        """Advance one step; returns the new temperature."""
        self.current_step += 1
        return self.temperature

    def state_dict(self) -> dict[str, int]:
        """``{"current_step": ...}``."""
        return {"current_step": self.current_step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore :meth:`state_dict`."""
        self.current_step = int(state["current_step"])


def _gate_lookup(gates: torch.Tensor, info: RowInfo, block_q: int, block_k: int, ndim: int) -> torch.Tensor:
    q_blocks = (info.q_pos // block_q).reshape(-1)
    k_blocks = (info.k_pos // block_k).reshape(-1)
    g = gates[:, q_blocks][:, :, k_blocks]  # [H, c, Sk]
    return g.reshape((1,) + tuple(g.shape)) if ndim == 4 else g


def block_gated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: torch.Tensor,
    block_size: int | Sequence[int],
    *,
    causal: bool = False,
    scale: float | None = None,
    key_lengths: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Softmax attention re-weighted by block gates: ``p_ij ~ z[h, i // bq, j // bk] exp(s_ij)``.

    ``gates``: ``[H or 1, >= nqb, >= nkb]`` in ``[0, 1]`` (e.g. from :class:`LearnableBlockMask`);
    a gate of 0 removes the block, gradients reach the gates. A row whose open blocks hold no
    allowed key gets 0. Chunked over queries (memory ``O(chunk x Sk)``).
    """
    _bsz, sq, sk, heads, _, _ = check_qkv(q, k, v)
    pair = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    if len(pair) != 2 or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in pair):
        raise ValueError(f"block_size must be a positive int or a pair of them, got {block_size!r}")
    bq, bk = pair
    nqb, nkb = -(-sq // bq), -(-sk // bk)
    if gates.dim() != 3 or gates.shape[0] not in (1, heads) or gates.shape[1] < nqb or gates.shape[2] < nkb:
        raise ValueError(f"gates must be [1 or {heads}, >= {nqb}, >= {nkb}], got {tuple(gates.shape)}")

    def normalize(scores: torch.Tensor, mask: torch.Tensor, info: RowInfo) -> torch.Tensor:
        z = _gate_lookup(gates.to(scores.dtype), info, bq, bk, scores.dim())
        weights = masked_softmax(scores, mask) * z
        total = weights.sum(-1, keepdim=True)
        return weights / torch.where(total > 0, total, torch.ones_like(total))

    return rowwise_attention(
        q, k, v, normalize, scale=scale, causal=causal, key_lengths=key_lengths,
        key_padding_mask=key_padding_mask, chunk_size=chunk_size,
    )


class LearnableBlockMask(nn.Module):
    """Learnable Bernoulli block mask, binary-Concrete relaxed, with an L0-style penalty.

    One logit per (head, query block, key block) up to ``max_seq_len``. In training mode a gate is
    sampled as ``s = sigmoid((logit + log u - log(1 - u)) / temperature)`` (Maddison et al.;
    Jang et al.) and, with ``hard``, thresholded at 0.5 with a straight-through gradient, so the
    forward uses true 0/1 masks. ``l0_loss()`` is the expected fraction of open gates
    (``mean sigmoid(logit)``, the probability that a hard gate is 1: Louizos et al., ICLR 2018).
    In eval mode gates are ``logit > 0``.

    ``l0_loss()`` and ``density()`` cover the gates in use: the query/key blocks of the longest
    sequences this mask has been applied to (or given explicitly), not the whole ``max_seq_len``
    grid. Gates past the sequences trained on get no task gradient, so an L0 penalty over them
    would only close them and dilute the penalty of the gates that matter, and a density over
    them would report an almost closed mask while the gates in use stay open.

    Args:
        num_heads: query heads (or 1 for a mask shared by the heads).
        max_seq_len: longest sequence (queries and keys) the mask covers.
        block_size: ``block`` or ``(block_q, block_k)`` (16, 32, 64, 128, 256).
        temperature: Concrete temperature (> 0); may be changed between steps.
        init_keep: initial probability that a gate is open, in ``(0, 1)``.
        hard: straight-through hard gates (else the soft relaxed gates).
        causal_init: start future blocks (key block after the query block) closed.
    """

    def __init__(self, num_heads: int, max_seq_len: int, block_size: int | Sequence[int] = 64, *,
                 temperature: float = 0.5, init_keep: float = 0.9, hard: bool = True,
                 causal_init: bool = False) -> None:
        super().__init__()
        self.block_q, self.block_k = normalize_block_size(block_size)
        if not 0 < init_keep < 1:
            raise ValueError(f"init_keep must be in (0, 1), got {init_keep}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        nqb, nkb = -(-max_seq_len // self.block_q), -(-max_seq_len // self.block_k)
        logits = torch.full((num_heads, nqb, nkb), math.log(init_keep / (1 - init_keep)))
        if causal_init:
            future = torch.arange(nkb).view(1, -1) * self.block_k > (torch.arange(nqb).view(-1, 1) + 1) * self.block_q - 1
            logits = logits.masked_fill(future, -math.log(init_keep / (1 - init_keep)))
        self.logits = nn.Parameter(logits)
        self.temperature = float(temperature)
        self.hard = hard
        self.max_seq_len = max_seq_len
        self.used_blocks: tuple[int, int] = (0, 0)  # (query, key) blocks of the longest inputs seen

    @property
    def block_size(self) -> tuple[int, int]:
        """``(block_q, block_k)``."""
        return (self.block_q, self.block_k)

    def gates(self, nqb: int, nkb: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Gates ``[H, nqb, nkb]``: sampled in training mode, ``logit > 0`` in eval mode."""
        if nqb > self.logits.shape[1] or nkb > self.logits.shape[2]:
            raise ValueError(f"sequence longer than max_seq_len={self.max_seq_len}")
        self.used_blocks = (max(self.used_blocks[0], nqb), max(self.used_blocks[1], nkb))
        logits = self.logits[:, :nqb, :nkb]
        if not self.training:
            return (logits > 0).to(logits.dtype)
        u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
        u = u.clamp(1e-6, 1 - 1e-6)
        soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / self.temperature)
        if not self.hard:
            return soft
        return (soft > 0.5).to(soft.dtype) - soft.detach() + soft

    def _region(self, seq_len_q: int | None, seq_len_k: int | None) -> torch.Tensor:
        """Logits of the gates in use: ``[H, nqb, nkb]`` for the given lengths, else the blocks seen."""
        if seq_len_q is None and seq_len_k is None:
            nqb, nkb = self.used_blocks
            if nqb == 0 or nkb == 0:  # never applied: every gate
                return self.logits
        else:
            seq_len_q = self.max_seq_len if seq_len_q is None else seq_len_q
            seq_len_k = seq_len_q if seq_len_k is None else seq_len_k
            nqb, nkb = -(-seq_len_q // self.block_q), -(-seq_len_k // self.block_k)
        return self.logits[:, :nqb, :nkb]

    def l0_loss(self, seq_len_q: int | None = None, seq_len_k: int | None = None) -> torch.Tensor:
        """Expected fraction of open gates in use (differentiable; add ``lambda * l0_loss()`` to the loss).

        Over the gates of ``seq_len_q x seq_len_k`` tokens when given, else over the blocks of the
        longest inputs this mask has been applied to (every gate before the first call).
        """
        return torch.sigmoid(self._region(seq_len_q, seq_len_k)).mean()

    def density(self, seq_len_q: int | None = None, seq_len_k: int | None = None) -> float:
        """Fraction of the gates in use (as in :meth:`l0_loss`) open in eval mode (``logit > 0``)."""
        return float((self._region(seq_len_q, seq_len_k) > 0).float().mean())

    def to_layout(self, seq_len_q: int, seq_len_k: int | None = None) -> BlockSparseLayout:
        """The eval-mode gates as a per-head :class:`~dilated_sparse.BlockSparseLayout`."""
        seq_len_k = seq_len_q if seq_len_k is None else seq_len_k
        nqb, nkb = -(-seq_len_q // self.block_q), -(-seq_len_k // self.block_k)
        mask = (self.logits.detach()[:, :nqb, :nkb] > 0).unsqueeze(0)
        return BlockSparseLayout.from_dense_mask(mask, block_size=self.block_size, seq_len_q=seq_len_q,
                                                 seq_len_k=seq_len_k)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **options: object) -> torch.Tensor:
        """:func:`block_gated_attention` with freshly sampled (training) or fixed (eval) gates."""
        nqb, nkb = -(-q.shape[1] // self.block_q), -(-k.shape[1] // self.block_k)
        return block_gated_attention(q, k, v, self.gates(nqb, nkb), self.block_size, **options)  # type: ignore[arg-type]
