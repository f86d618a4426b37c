"""Block-sparse attention layouts: which (query block, key block) pairs are computed.

A :class:`BlockSparseLayout` stores a CSR matrix over the stacked block rows of ``L = Lb * Lh``
slices (``Lb`` is 1 or the batch size, ``Lh`` is 1 or the number of query heads) and, built lazily
and cached, its CSC transpose for the backward pass. Nothing here ever allocates a dense
``nqb x nkb`` matrix except the explicit dense interop helpers (``to_dense_mask``,
``from_dense_mask``). See ``DESIGN.md`` section 2 for the format.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["SUPPORTED_BLOCK_SIZES", "BlockSparseLayout", "csr_transpose", "normalize_block_size"]

SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128, 256)

_IndexLike = torch.Tensor | Sequence[int]


def normalize_block_size(block_size: int | Sequence[int]) -> tuple[int, int]:
    """Return ``(block_q, block_k)`` from an int or a pair, checking each is supported."""
    if isinstance(block_size, bool):
        raise TypeError(f"block_size must be an int or a pair of ints, got {block_size!r}")
    if isinstance(block_size, int):
        pair = (block_size, block_size)
    else:
        try:
            pair = tuple(int(b) for b in block_size)
        except TypeError:
            raise TypeError(
                f"block_size must be an int or a pair of ints, got {block_size!r}"
            ) from None
        if len(pair) != 2:
            raise ValueError(f"block_size must be an int or a pair (block_q, block_k), got {block_size!r}")
    for name, b in zip(("block_q", "block_k"), pair):
        if b not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(
                f"block_size: {name}={b} is not supported; expected one of {SUPPORTED_BLOCK_SIZES}"
            )
    return pair  # type: ignore[return-value]


def _check_seq_len(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def _as_index_tensor(name: str, value: _IndexLike, device: torch.device | None = None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got dtype {value.dtype}")
        if value.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(value.shape)}")
        t = value
    else:
        items = list(value)
        # Not as_tensor(..., dtype=int64), which truncates 0.7 to block 0 without a word.
        t = torch.as_tensor(items) if items else torch.empty(0, dtype=torch.int64)
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got {t.dtype} values")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D")
        t = t.to(torch.int64)
    if device is not None:
        t = t.to(device)
    return t


def _sized(value: Any, n: int) -> bool:
    """Whether ``value`` is a sequence (or 1-D tensor) of ``n`` items."""
    if isinstance(value, torch.Tensor):
        return value.dim() == 1 and value.numel() == n
    return not isinstance(value, (str, bytes)) and hasattr(value, "__len__") and len(value) == n


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def csr_transpose(
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    *,
    num_slices: int,
    num_query_blocks: int,
    num_key_blocks: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CSC ``(ccol_indices, row_indices)`` of a stacked CSR layout, in O(nnz log nnz), no dense.

    Runs on the indices' device with no host synchronisation (so it can also be traced).
    """
    crow = crow_indices.to(torch.int64)
    nnz = col_indices.numel()
    stacked_rows = torch.repeat_interleave(
        torch.arange(num_slices * num_query_blocks, device=crow.device), crow[1:] - crow[:-1],
        output_size=nnz,
    )
    slices = stacked_rows // num_query_blocks
    local_rows = stacked_rows - slices * num_query_blocks
    column_key = slices * num_key_blocks + col_indices.to(torch.int64)
    # CSR order is row-major, so a stable sort by column keeps rows increasing within a column.
    order = torch.sort(column_key, stable=True).indices
    counts = torch.zeros(num_slices * num_key_blocks, dtype=torch.int64, device=crow.device)
    counts.index_add_(0, column_key, torch.ones_like(column_key))
    ccol = torch.zeros(num_slices * num_key_blocks + 1, dtype=torch.int64, device=crow.device)
    ccol[1:] = torch.cumsum(counts, 0)
    return ccol.to(torch.int32), local_rows[order].to(torch.int32).contiguous()


class BlockSparseLayout:
    """A validated block-sparse attention layout (CSR rows plus a cached CSC transpose).

    Args:
        crow_indices: ``[L * nqb + 1]`` row offsets into ``col_indices`` (any integer dtype;
            stored as int32).
        col_indices: ``[nnz]`` key-block ids, strictly increasing within each row, each ``< nkb``.
        block_size: ``block`` or ``(block_q, block_k)``, each one of 16, 32, 64, 128, 256.
        seq_len_q: query sequence length (need not be a multiple of ``block_q``).
        seq_len_k: key sequence length, defaults to ``seq_len_q``.
        layout_batch: ``Lb``: 1 (shared over the batch) or the batch size.
        layout_heads: ``Lh``: 1 (shared over heads) or the number of query heads.
        validate: check the indices (default). Pass ``False`` only for indices built by trusted
            code on the device (no host synchronisation happens then).
        max_slice_nnz: the largest nnz of a slice, when known without a host sync (only used with
            ``validate=False``).

    Raises:
        ValueError / TypeError naming the offending argument.
    """

    def __init__(
        self,
        crow_indices: _IndexLike,
        col_indices: _IndexLike,
        *,
        block_size: int | Sequence[int],
        seq_len_q: int,
        seq_len_k: int | None = None,
        layout_batch: int = 1,
        layout_heads: int = 1,
        validate: bool = True,
        max_slice_nnz: int | None = None,
    ) -> None:
        self.block_q, self.block_k = normalize_block_size(block_size)
        self.seq_len_q = _check_seq_len("seq_len_q", seq_len_q)
        self.seq_len_k = _check_seq_len("seq_len_k", seq_len_q if seq_len_k is None else seq_len_k)
        self.layout_batch = _check_seq_len("layout_batch", layout_batch)
        self.layout_heads = _check_seq_len("layout_heads", layout_heads)
        crow = _as_index_tensor("crow_indices", crow_indices)
        col = _as_index_tensor("col_indices", col_indices, device=crow.device)
        if col.device != crow.device:
            raise ValueError("crow_indices and col_indices must be on the same device")
        expected = self.num_slices * self.num_query_blocks + 1
        if crow.numel() != expected:
            raise ValueError(
                f"crow_indices must have L * nqb + 1 = {self.num_slices} * {self.num_query_blocks} + 1"
                f" = {expected} entries (seq_len_q={self.seq_len_q}, block_q={self.block_q}),"
                f" got {crow.numel()}"
            )
        if max(crow.numel(), col.numel()) >= 2**31:
            raise ValueError("layouts with 2**31 or more blocks are not supported (int32 indices)")
        self._max_slice_nnz = max_slice_nnz
        if validate:  # on the given values: the int32 cast below would wrap 2**32 + 1 to 1
            self._max_slice_nnz = self._validate(crow, col)
        self.crow_indices = crow.to(torch.int32).contiguous()
        self.col_indices = col.to(torch.int32).contiguous()
        self._csc: tuple[torch.Tensor, torch.Tensor] | None = None
        self._device_cache: dict[torch.device, BlockSparseLayout] = {}

    # ------------------------------------------------------------------ sizes
    @property
    def block_size(self) -> tuple[int, int]:
        """``(block_q, block_k)``."""
        return (self.block_q, self.block_k)

    @property
    def num_query_blocks(self) -> int:
        """``nqb = ceil(seq_len_q / block_q)``."""
        return _ceil_div(self.seq_len_q, self.block_q)

    @property
    def num_key_blocks(self) -> int:
        """``nkb = ceil(seq_len_k / block_k)``."""
        return _ceil_div(self.seq_len_k, self.block_k)

    @property
    def num_slices(self) -> int:
        """``L = layout_batch * layout_heads``."""
        return self.layout_batch * self.layout_heads

    @property
    def layout_shape(self) -> tuple[int, int]:
        """``(Lb, Lh)``."""
        return (self.layout_batch, self.layout_heads)

    @property
    def nnz(self) -> int:
        """Number of active (query block, key block) pairs over all slices."""
        return self.col_indices.numel()

    @property
    def density(self) -> float:
        """Active blocks over all blocks (block-level density, in ``[0, 1]``)."""
        total = self.num_slices * self.num_query_blocks * self.num_key_blocks
        return self.nnz / total

    @property
    def sparsity(self) -> float:
        """``1 - density``."""
        return 1.0 - self.density

    @property
    def device(self) -> torch.device:
        """Device of the index tensors."""
        return self.crow_indices.device

    @property
    def max_slice_nnz(self) -> int:
        """Largest number of active blocks in one slice (sizes the weights dict)."""
        if self._max_slice_nnz is None:
            self._max_slice_nnz = int(self.slice_nnz().max().item()) if self.num_slices else 0
        return self._max_slice_nnz

    def slice_nnz(self) -> torch.Tensor:
        """int64 ``[L]``: active blocks per slice."""
        starts = self.crow_indices[:: self.num_query_blocks].to(torch.int64)
        return starts[1:] - starts[:-1]

    def row_counts(self) -> torch.Tensor:
        """int64 ``[L * nqb]``: active key blocks per (stacked) query-block row."""
        crow = self.crow_indices.to(torch.int64)
        return crow[1:] - crow[:-1]

    def row_ids(self) -> torch.Tensor:
        """int64 ``[nnz]``: the stacked row ``s * nqb + q_block`` of every CSR entry."""
        rows = torch.arange(self.num_slices * self.num_query_blocks, device=self.device)
        return torch.repeat_interleave(rows, self.row_counts(), output_size=self.nnz)

    # ------------------------------------------------------------- validation
    def _validate(self, crow_indices: torch.Tensor, col_indices: torch.Tensor) -> int:
        """Check the CSR structure of the given index tensors (before their int32 cast); returns
        the largest number of active blocks in one slice.

        Every condition is reduced on the tensors' device and read back in one copy, so a layout on
        a GPU costs one host synchronisation, not one a check; a failure then pays for its message.
        """
        crow = crow_indices.to(torch.int64)
        col = col_indices.to(torch.int64)
        nnz = col.numel()
        counts = crow[1:] - crow[:-1]
        slice_starts = crow[:: self.num_query_blocks]
        flags = [crow[0], crow[-1], (counts < 0).any(), (slice_starts[1:] - slice_starts[:-1]).max()]
        nkb = self.num_key_blocks
        if nnz > 0:
            out_of_range = (col < 0) | (col >= nkb)
            # Within a row the ids must strictly increase: every consecutive pair that does not
            # start a new row. Row starts are the offsets of non-empty rows; an empty row's offset
            # is the next row's start or nnz (slot nnz: a sink), and bad offsets are clamped here
            # (reported above, before these flags are read).
            row_start = torch.zeros(nnz + 1, dtype=torch.bool, device=col.device)
            row_start.index_fill_(0, crow[:-1].clamp(0, nnz), True)  # not `[...] = True`: a host scalar, copied with a sync
            step_ok = torch.ones(nnz, dtype=torch.bool, device=col.device)
            step_ok[1:] = col[1:] > col[:-1]
            bad_step = ~(step_ok | row_start[:nnz])
            flags += [out_of_range.any(), bad_step.any()]
        first, last, decreasing, max_slice_nnz, *id_flags = torch.stack(flags).tolist()
        if first != 0:
            raise ValueError(f"crow_indices must start at 0, got {first}")
        if last != nnz:
            raise ValueError(f"crow_indices must end at nnz = len(col_indices) = {nnz}, got {last}")
        if decreasing:
            bad = int(torch.nonzero(counts < 0)[0, 0])
            raise ValueError(f"crow_indices must be non-decreasing (decreases after entry {bad})")
        if nnz == 0:
            return max_slice_nnz
        if id_flags[0]:
            bad = int(torch.nonzero(out_of_range)[0, 0])
            raise ValueError(
                f"col_indices[{bad}] = {int(col[bad])} is out of range [0, {nkb}) "
                f"(nkb = ceil(seq_len_k={self.seq_len_k} / block_k={self.block_k}))"
            )
        if id_flags[1]:
            bad = int(torch.nonzero(bad_step)[0, 0])
            raise ValueError(
                f"col_indices must be strictly increasing (sorted, no duplicates) within each row: "
                f"col_indices[{bad - 1}] = {int(col[bad - 1])}, col_indices[{bad}] = {int(col[bad])}"
            )
        return max_slice_nnz

    # -------------------------------------------------------------- transpose
    @property
    def ccol_indices(self) -> torch.Tensor:
        """CSC column offsets ``[L * nkb + 1]`` (int32), computed once and cached."""
        return self._transpose()[0]

    @property
    def row_indices(self) -> torch.Tensor:
        """CSC query-block ids ``[nnz]`` (int32, increasing within a column), cached."""
        return self._transpose()[1]

    def _transpose(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._csc is None:
            self._csc = csr_transpose(
                self.crow_indices, self.col_indices,
                num_slices=self.num_slices, num_query_blocks=self.num_query_blocks,
                num_key_blocks=self.num_key_blocks,
            )
        return self._csc

    # ------------------------------------------------------------------ moves
    def to(self, device: torch.device | str) -> BlockSparseLayout:
        """This layout on ``device`` (cached: repeated calls return the same object)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device == self.device:
            return self
        cached = self._device_cache.get(device)
        if cached is None:
            cached = self._like(
                self.crow_indices.to(device), self.col_indices.to(device), validate=False
            )
            cached._max_slice_nnz = self._max_slice_nnz
            if self._csc is not None:
                cached._csc = (self._csc[0].to(device), self._csc[1].to(device))
            cached._device_cache[self.device] = self
            self._device_cache[device] = cached
        return cached

    def _like(self, crow: torch.Tensor, col: torch.Tensor, *, validate: bool = True) -> BlockSparseLayout:
        return BlockSparseLayout(
            crow,
            col,
            block_size=self.block_size,
            seq_len_q=self.seq_len_q,
            seq_len_k=self.seq_len_k,
            layout_batch=self.layout_batch,
            layout_heads=self.layout_heads,
            validate=validate,
        )

    # --------------------------------------------------------------- builders
    @classmethod
    def from_coo(
        cls,
        row_indices: _IndexLike,
        col_indices: _IndexLike,
        *,
        block_size: int | Sequence[int],
        seq_len_q: int,
        seq_len_k: int | None = None,
        slice_indices: _IndexLike | None = None,
        layout_batch: int = 1,
        layout_heads: int = 1,
    ) -> BlockSparseLayout:
        """Build from unordered (query block, key block[, slice]) coordinates in O(nnz log nnz).

        Duplicates are merged; coordinates out of range raise ``ValueError``.
        """
        bq, bk = normalize_block_size(block_size)
        seq_len_q = _check_seq_len("seq_len_q", seq_len_q)
        seq_len_k = seq_len_q if seq_len_k is None else _check_seq_len("seq_len_k", seq_len_k)
        nqb, nkb = _ceil_div(seq_len_q, bq), _ceil_div(seq_len_k, bk)
        num_slices = layout_batch * layout_heads
        rows = _as_index_tensor("row_indices", row_indices).to(torch.int64)
        cols = _as_index_tensor("col_indices", col_indices, device=rows.device).to(torch.int64)
        if rows.numel() != cols.numel():
            raise ValueError(
                f"row_indices and col_indices must have the same length, got {rows.numel()} and {cols.numel()}"
            )
        if slice_indices is None:
            if num_slices != 1:
                raise ValueError("slice_indices is required when layout_batch * layout_heads > 1")
            slices = torch.zeros_like(rows)
        else:
            slices = _as_index_tensor("slice_indices", slice_indices, device=rows.device).to(torch.int64)
            if slices.numel() != rows.numel():
                raise ValueError("slice_indices must have the same length as row_indices")
        for name, t, hi in (("row_indices", rows, nqb), ("col_indices", cols, nkb), ("slice_indices", slices, num_slices)):
            if t.numel() and bool(((t < 0) | (t >= hi)).any()):
                bad = int(torch.nonzero((t < 0) | (t >= hi))[0, 0])
                raise ValueError(f"{name}[{bad}] = {int(t[bad])} is out of range [0, {hi})")
        keys = torch.unique((slices * nqb + rows) * nkb + cols)  # sorted, row-major
        stacked_rows = keys // nkb
        counts = torch.zeros(num_slices * nqb, dtype=torch.int64, device=keys.device)
        counts.index_add_(0, stacked_rows, torch.ones_like(stacked_rows))
        crow = torch.zeros(num_slices * nqb + 1, dtype=torch.int64, device=keys.device)
        crow[1:] = torch.cumsum(counts, 0)
        return cls(
            crow,
            keys % nkb,
            block_size=(bq, bk),
            seq_len_q=seq_len_q,
            seq_len_k=seq_len_k,
            layout_batch=layout_batch,
            layout_heads=layout_heads,
        )

    @classmethod
    def from_block_pairs(
        cls,
        pairs: Any,
        *,
        block_size: int | Sequence[int],
        seq_len_q: int,
        seq_len_k: int | None = None,
    ) -> BlockSparseLayout:
        """Build a shared layout from ``(row_indices, col_indices)`` lists (the seed guides' form).

        ``pairs`` is either a 2-tuple of equal-length index sequences/tensors, a list of
        ``(q_block, k_block)`` pairs, or an integer tensor ``[n, 2]``.
        """
        if isinstance(pairs, torch.Tensor):
            if pairs.dim() != 2 or pairs.shape[1] != 2:
                raise ValueError(f"pairs tensor must be [n, 2], got {tuple(pairs.shape)}")
            rows, cols = pairs[:, 0], pairs[:, 1]
        elif isinstance(pairs, tuple) and len(pairs) == 2 and not isinstance(pairs[0], int):
            rows, cols = pairs
            if _sized(rows, 2) and _sized(cols, 2):
                raise ValueError(
                    "pairs: a 2-tuple of two length-2 sequences is ambiguous (two (q_block, k_block) "
                    "pairs, or the rows and columns of two blocks); pass a list of pairs, or use "
                    "from_coo(rows, cols)"
                )
        else:
            pair_list = list(pairs)
            if not all(_sized(p, 2) for p in pair_list):
                raise ValueError("pairs must be (q_block, k_block) pairs")
            try:  # operator.index: an int (or integer scalar), never a truncated float
                rows = [operator.index(p[0]) for p in pair_list]
                cols = [operator.index(p[1]) for p in pair_list]
            except TypeError as error:
                raise TypeError(f"pairs must hold integer block indices ({error})") from None
        return cls.from_coo(rows, cols, block_size=block_size, seq_len_q=seq_len_q, seq_len_k=seq_len_k)

    @classmethod
    def from_dense_mask(
        cls,
        mask: torch.Tensor,
        *,
        block_size: int | Sequence[int],
        seq_len_q: int,
        seq_len_k: int | None = None,
        validate: bool = True,
    ) -> BlockSparseLayout:
        """Build from a bool block mask ``[nqb, nkb]``, ``[Lh, nqb, nkb]`` or ``[Lb, Lh, nqb, nkb]``.

        A mask always gives a well-formed CSR; ``validate=False`` skips the (host-syncing) value
        checks for callers that build a layout from a fresh mask on every call.
        """
        if not isinstance(mask, torch.Tensor):
            raise TypeError("mask must be a torch.Tensor")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got dtype {mask.dtype}")
        if mask.dim() not in (2, 3, 4):
            raise ValueError(f"mask must be [nqb, nkb], [Lh, nqb, nkb] or [Lb, Lh, nqb, nkb], got {tuple(mask.shape)}")
        mask4 = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        bq, bk = normalize_block_size(block_size)
        seq_len_q = _check_seq_len("seq_len_q", seq_len_q)
        seq_len_k = seq_len_q if seq_len_k is None else _check_seq_len("seq_len_k", seq_len_k)
        nqb, nkb = _ceil_div(seq_len_q, bq), _ceil_div(seq_len_k, bk)
        if tuple(mask4.shape[2:]) != (nqb, nkb):
            raise ValueError(
                f"mask block shape {tuple(mask4.shape[2:])} does not match (nqb, nkb) = ({nqb}, {nkb}) "
                f"for seq_len_q={seq_len_q}, seq_len_k={seq_len_k}, block_size={(bq, bk)}"
            )
        lb, lh = int(mask4.shape[0]), int(mask4.shape[1])
        flat = mask4.reshape(lb * lh * nqb, nkb)
        counts = flat.sum(dim=1, dtype=torch.int64)
        crow = torch.zeros(flat.shape[0] + 1, dtype=torch.int64, device=mask.device)
        crow[1:] = torch.cumsum(counts, 0)
        col = torch.nonzero(flat)[:, 1]  # row-major, so sorted within each row
        return cls(crow, col, block_size=(bq, bk), seq_len_q=seq_len_q, seq_len_k=seq_len_k,
                   layout_batch=lb, layout_heads=lh, validate=validate)

    def to_dense_mask(self) -> torch.Tensor:
        """Bool ``[Lb, Lh, nqb, nkb]`` block mask (dense: for small layouts and tests)."""
        nqb, nkb = self.num_query_blocks, self.num_key_blocks
        dense = torch.zeros(self.num_slices * nqb * nkb, dtype=torch.bool, device=self.device)
        dense[self.row_ids() * nkb + self.col_indices.to(torch.int64)] = True
        return dense.view(self.layout_batch, self.layout_heads, nqb, nkb)

    @classmethod
    def from_flex_block_mask(cls, block_mask: Any) -> BlockSparseLayout:
        """Build from a PyTorch FlexAttention ``BlockMask`` (partial and full blocks, unioned).

        The block mask's batch and head dims become ``(Lb, Lh)``. Its ``mask_mod`` (token-level
        rules inside a block) is not representable and is dropped: express causal/window rules
        through ``block_sparse_attention``'s arguments.
        """
        bq, bk = block_mask.BLOCK_SIZE
        seq_len_q, seq_len_k = block_mask.seq_lengths
        num = block_mask.kv_num_blocks
        idx = block_mask.kv_indices
        lb, lh, nqb = (int(s) for s in num.shape)
        parts = [(num, idx)]
        if getattr(block_mask, "full_kv_num_blocks", None) is not None:
            parts.append((block_mask.full_kv_num_blocks, block_mask.full_kv_indices))
        rows, cols, slices = [], [], []
        for counts, indices in parts:
            width = indices.shape[-1]
            keep = torch.arange(width, device=counts.device) < counts.unsqueeze(-1).to(torch.int64)
            s_idx, r_idx, w_idx = torch.nonzero(keep.reshape(lb * lh, nqb, width), as_tuple=True)
            rows.append(r_idx)
            slices.append(s_idx)
            cols.append(indices.reshape(lb * lh, nqb, width)[s_idx, r_idx, w_idx].to(torch.int64))
        return cls.from_coo(
            torch.cat(rows), torch.cat(cols), slice_indices=torch.cat(slices),
            block_size=(int(bq), int(bk)), seq_len_q=int(seq_len_q), seq_len_k=int(seq_len_k),
            layout_batch=lb, layout_heads=lh,
        )

    def to_flex_block_mask(self, causal: bool = False) -> Any:
        """A FlexAttention ``BlockMask`` computing exactly the tokens this layout (and ``causal``) allow.

        Active blocks are listed as *full* blocks (no per-token mask in the compiled kernel) except,
        when ``causal``, those crossing the diagonal, which are *partial*. The ``mask_mod`` looks
        each token pair's block up in the ``[Lb, Lh, nqb, nkb]`` block mask, so uncompiled
        FlexAttention (which evaluates ``mask_mod`` densely) gives the same result. The block grid
        is what ``BlockMask`` itself stores; no token-level mask is built.
        """
        from torch.nn.attention.flex_attention import BlockMask

        blocks = self.to_dense_mask()
        lb, lh, nqb, nkb = blocks.shape
        bq, bk = self.block_q, self.block_k
        partial = torch.zeros_like(blocks)
        if causal:
            q_first = torch.arange(nqb, device=blocks.device).view(-1, 1) * bq
            k_first = torch.arange(nkb, device=blocks.device).view(1, -1) * bk
            q_last = (q_first + bq - 1).clamp(max=self.seq_len_q - 1)
            blocks = blocks & (k_first <= q_last)  # drop blocks wholly after every query
            partial = blocks & (k_first + bk - 1 > q_first)  # straddles the diagonal: masked per token
        full = blocks & ~partial

        def ordered(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # BlockMask wants [.., nqb, nkb] index rows whose first `count` entries are the blocks.
            counts = mask.sum(-1, dtype=torch.int32)
            indices = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)
            return counts, indices

        def mask_mod(b, h, q_idx, kv_idx):
            allowed = blocks[b if lb > 1 else 0, h if lh > 1 else 0, q_idx // bq, kv_idx // bk]
            return allowed & (kv_idx <= q_idx) if causal else allowed

        kv_num, kv_idx = ordered(partial)
        full_num, full_idx = ordered(full)
        return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(bq, bk), mask_mod=mask_mod,
                                        seq_lengths=(self.seq_len_q, self.seq_len_k))

    # ------------------------------------------------------------------ misc
    def weights_dict(self, block_values: torch.Tensor, shape: tuple[int, int, int, int]) -> dict[str, Any]:
        """The sparse attention-weights dict (DESIGN.md section 4) around ``block_values``.

        Args:
            block_values: ``[B, H, max_slice_nnz, block_q, block_k]``, slice ``s`` filling entries
                ``0 .. nnz(s) - 1`` in its CSR order.
            shape: ``(B, H, Sq, Sk)`` of the dense weights they stand for.

        Returns:
            ``{"block_values", "shape", "block_size"}`` plus ``block_indices`` (``[nnz, 2]``
            (q_block, k_block) pairs) for a shared layout, or ``crow_indices``, ``col_indices`` and
            ``layout_shape`` when there are several slices.
        """
        result: dict[str, Any] = {"block_values": block_values, "shape": tuple(shape), "block_size": self.block_size}
        if self.num_slices == 1:
            result["block_indices"] = torch.stack([self.row_ids(), self.col_indices.to(torch.int64)], dim=1)
        else:
            result["crow_indices"] = self.crow_indices
            result["col_indices"] = self.col_indices
            result["layout_shape"] = self.layout_shape
        return result

    def equal(self, other: BlockSparseLayout) -> bool:
        """True when both layouts describe the same blocks for the same sizes."""
        return (
            self.block_size == other.block_size
            and self.seq_len_q == other.seq_len_q
            and self.seq_len_k == other.seq_len_k
            and self.layout_shape == other.layout_shape
            and torch.equal(self.crow_indices.cpu(), other.crow_indices.cpu())
            and torch.equal(self.col_indices.cpu(), other.col_indices.cpu())
        )

    def __repr__(self) -> str:
        return (
            f"BlockSparseLayout(block_size={self.block_size}, seq_len_q={self.seq_len_q}, "
            f"seq_len_k={self.seq_len_k}, layout_shape={self.layout_shape}, nnz={self.nnz}, "
            f"density={self.density:.4f}, device={self.device})"
        )
