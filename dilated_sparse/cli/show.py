"""``dilated-sparse show``: draw a pattern's block layout and print its statistics.

The picture never needs a dense ``nqb x nkb`` matrix: :func:`block_grid` bins the CSR entries of
one slice into at most ``max_rows x max_cols`` picture cells (O(nnz) time, picture-sized memory),
each holding the fraction of its blocks that are active.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import torch

from ..layout import BlockSparseLayout
from ._args import CLI_HIDDEN_OPTIONS, CliError, block_size, non_negative_int, parse_pattern_options, positive_int

__all__ = ["ACCEPTS_PATTERN_OPTIONS", "add_parser", "block_grid", "build_layout", "layout_stats",
           "option_named_in", "render_ascii", "run", "save_picture"]

ACCEPTS_PATTERN_OPTIONS = True

_SHADES_UNICODE = "·░▒▓█"
_SHADES_ASCII = ".:+*#"


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register the ``show`` subcommand."""
    parser = sub.add_parser(
        "show", help="draw a pattern's block layout and print its stats",
        description="Draw the block layout of a registered pattern (PNG with matplotlib, or text) "
        "and print its density and statistics. Pattern options follow the pattern name as "
        "--option VALUE (lists as 1,2,4; booleans as --flag / --no-flag); `show --list` lists the "
        "patterns and their options.",
        allow_abbrev=False,
    )
    parser.add_argument("pattern", nargs="?", metavar="PATTERN", help="a registered pattern name")
    parser.add_argument("--list", action="store_true", help="list the patterns and their options")
    parser.add_argument("--seq-len", type=positive_int, metavar="N", help="query length (tokens)")
    parser.add_argument("--seq-len-k", type=positive_int, metavar="N", help="key length (default: --seq-len)")
    parser.add_argument("--block-size", type=block_size, default=(64, 64), metavar="B",
                        help="block size, B or BQxBK (default 64)")
    parser.add_argument("--heads", type=positive_int, metavar="H",
                        help="number of heads (passed as num_heads to patterns that take it)")
    parser.add_argument("--head", type=non_negative_int, metavar="I",
                        help="draw only this head of a per-head layout (default: up to 8 heads)")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("-o", "--output", metavar="FILE.png", help="write a picture (needs matplotlib)")
    out.add_argument("--ascii", action="store_true", help="print the layout as text (the default)")
    parser.add_argument("--width", type=positive_int, default=64, metavar="COLS",
                        help="largest text picture width in cells (default 64)")
    parser.add_argument("--pixels", type=positive_int, default=256, metavar="CELLS",
                        help="largest picture side in cells for -o (default 256)")
    parser.add_argument("--title", help="picture title (default: the pattern and its options)")
    return parser


# --------------------------------------------------------------------------- layouts
def build_layout(pattern: str, *, seq_len: int, seq_len_k: int | None, block: tuple[int, int],
                 heads: int | None, options: dict[str, Any]) -> BlockSparseLayout:
    """The pattern's layout through the registry; bad names/options become :class:`CliError`."""
    from ..patterns import make_layout, pattern_options

    if heads is not None:
        if "num_heads" not in pattern_options(pattern):
            raise CliError("--heads", f"pattern {pattern!r} has one layout for all heads (it takes no num_heads)")
        if "num_heads" not in options:
            options = {**options, "num_heads": heads}
    try:
        return make_layout(pattern, seq_len_q=seq_len, seq_len_k=seq_len_k, block_size=block, **options)
    except (TypeError, ValueError) as error:
        raise CliError(option_named_in(str(error), options), f"pattern {pattern!r}: {error}") from None


def option_named_in(message: str, options: dict[str, Any]) -> str | None:
    """The ``--flag`` of the pattern option a generator's error message names (longest match), if any."""
    named = [key for key in options if key in message]
    return "--" + max(named, key=len).replace("_", "-") if named else None


def _check_pattern(pattern: str | None) -> str:
    from ..patterns import available_patterns, get_pattern

    if pattern is None:
        raise CliError("PATTERN", f"a pattern name is required; choose one of: {', '.join(available_patterns())}")
    try:
        get_pattern(pattern)
    except (TypeError, ValueError) as error:
        raise CliError("PATTERN", str(error)) from None
    return pattern


def block_grid(layout: BlockSparseLayout, slice_index: int = 0, *, max_rows: int = 256,
               max_cols: int = 256) -> torch.Tensor:
    """Float ``[rows, cols]`` in ``[0, 1]``: the active fraction of the blocks in each cell.

    Each cell covers ``ceil(nqb / max_rows)`` query blocks by ``ceil(nkb / max_cols)`` key blocks
    of slice ``slice_index``, so the result is at most ``max_rows x max_cols`` and exact (one
    block per cell) when the layout is small enough.
    """
    nqb, nkb = layout.num_query_blocks, layout.num_key_blocks
    if not 0 <= slice_index < layout.num_slices:
        raise ValueError(f"slice_index {slice_index} out of range [0, {layout.num_slices})")
    fr, fc = math.ceil(nqb / max_rows), math.ceil(nkb / max_cols)
    rows, cols = math.ceil(nqb / fr), math.ceil(nkb / fc)
    crow = layout.crow_indices.cpu().to(torch.int64)
    lo = int(crow[slice_index * nqb])
    counts = crow[slice_index * nqb + 1:(slice_index + 1) * nqb + 1] - crow[slice_index * nqb:(slice_index + 1) * nqb]
    nnz = int(counts.sum())
    q_blocks = torch.repeat_interleave(torch.arange(nqb), counts, output_size=nnz)
    k_blocks = layout.col_indices.cpu().to(torch.int64)[lo:lo + nnz]
    cells = (q_blocks // fr) * cols + k_blocks // fc
    hits = torch.bincount(cells, minlength=rows * cols).view(rows, cols).to(torch.float64)
    cap_r = (nqb - torch.arange(rows) * fr).clamp(max=fr)
    cap_c = (nkb - torch.arange(cols) * fc).clamp(max=fc)
    return hits / (cap_r.view(-1, 1) * cap_c.view(1, -1)).to(torch.float64)


def _shades() -> str:
    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        _SHADES_UNICODE.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return _SHADES_ASCII
    return _SHADES_UNICODE


def render_ascii(grid: torch.Tensor, shades: str | None = None, *, cell_width: int = 1) -> str:
    """Text picture of a :func:`block_grid`: empty cells dim, fuller cells darker.

    ``cell_width`` characters per cell (2 keeps small layouts roughly square on a terminal).
    """
    shades = shades or _shades()
    levels = len(shades) - 1
    idx = torch.where(grid > 0, (grid * levels).ceil().clamp(1, levels), torch.zeros_like(grid)).to(torch.int64)
    return "\n".join("".join(shades[i] * cell_width for i in row) for row in idx.tolist())


def layout_stats(layout: BlockSparseLayout) -> dict[str, Any]:
    """Density and per-row / per-column counts of a layout (O(nnz), no dense matrix)."""
    nqb, nkb = layout.num_query_blocks, layout.num_key_blocks
    per_row = layout.row_counts().to(torch.float64)
    ccol = layout.ccol_indices.to(torch.int64)
    per_col = (ccol[1:] - ccol[:-1]).to(torch.float64)
    index_bytes = 4 * (layout.crow_indices.numel() + 2 * layout.nnz + ccol.numel())
    return {
        "seq_len_q": layout.seq_len_q,
        "seq_len_k": layout.seq_len_k,
        "block_size": layout.block_size,
        "blocks": (nqb, nkb),
        "layout_shape": layout.layout_shape,
        "nnz": layout.nnz,
        "density": layout.density,
        "row_min": int(per_row.min()), "row_mean": float(per_row.mean()), "row_max": int(per_row.max()),
        "empty_rows": int((per_row == 0).sum()),
        "col_min": int(per_col.min()), "col_mean": float(per_col.mean()), "col_max": int(per_col.max()),
        "index_bytes": index_bytes,
        "tokens_per_query": float(per_row.mean()) * layout.block_k,
    }


def _describe(pattern: str, options: dict[str, Any]) -> str:
    if not options:
        return pattern
    return f"{pattern} (" + ", ".join(f"{k}={v}" for k, v in options.items()) + ")"


def _format_stats(stats: dict[str, Any]) -> str:
    nqb, nkb = stats["blocks"]
    kib = stats["index_bytes"] / 1024
    return "\n".join([
        (f"geometry     seq_len_q={stats['seq_len_q']} seq_len_k={stats['seq_len_k']} "
        f"block_size={stats['block_size']} -> {nqb} x {nkb} blocks"),
        f"slices       layout_batch x layout_heads = {stats['layout_shape'][0]} x {stats['layout_shape'][1]}",
        (f"active       {stats['nnz']} blocks, density {100 * stats['density']:.2f}% "
        f"(sparsity {100 * (1 - stats['density']):.2f}%)"),
        (f"per row      min {stats['row_min']} / mean {stats['row_mean']:.1f} / max {stats['row_max']} "
        f"key blocks; {stats['empty_rows']} empty rows"),
        f"per column   min {stats['col_min']} / mean {stats['col_mean']:.1f} / max {stats['col_max']} query blocks",
        f"keys/query   ~{stats['tokens_per_query']:.0f} tokens (vs {stats['seq_len_k']} dense)",
        f"indices      {kib:.1f} KiB (CSR + CSC, int32)",
    ])


def _visible(grid: torch.Tensor) -> torch.Tensor:
    """Shade for a picture: 0 stays white, any active block is at least 25% dark (so a cell
    holding one active block out of hundreds still shows), full cells are darkest."""
    return torch.where(grid > 0, 0.25 + 0.75 * grid, torch.zeros_like(grid))


def save_picture(layout: BlockSparseLayout, path: str, *, title: str, heads: list[int],
                 max_cells: int = 256, dpi: int = 80) -> None:
    """Write a PNG of the chosen slices (heads) of ``layout`` with matplotlib (Agg).

    Each panel is a :func:`block_grid` of at most ``max_cells x max_cells`` cells; when a cell
    covers several blocks its shade grows with the active fraction (any active block shows).
    """
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(heads)
    ncols = min(n, 4)
    nrows = math.ceil(n / ncols)
    side = 2.6 if n > 1 else 3.2
    nqb, nkb = layout.num_query_blocks, layout.num_key_blocks
    grids = [block_grid(layout, head, max_rows=max_cells, max_cols=max_cells) for head in heads]
    rows, cols = grids[0].shape
    if (rows, cols) != (nqb, nkb):
        title += f", 1 cell = {math.ceil(nqb / rows)}x{math.ceil(nkb / cols)} blocks"
    width = int(12 * side * ncols)
    wrapped = "\n".join(line for part in title.split("\n") for line in (textwrap.wrap(part, width=width) or [""]))
    lines = wrapped.count("\n") + 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(side * ncols, side * nrows + 0.15 * lines + 0.2), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, head, grid in zip(axes.flat, heads, grids):
        ax.imshow(_visible(grid).numpy(), cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest",
                  extent=(0, nkb, nqb, 0), aspect="auto")
        ax.set_xlabel("key block", fontsize=7)
        ax.set_ylabel("query block", fontsize=7)
        ax.tick_params(labelsize=6)
        if n > 1:
            ax.set_title(f"head {head}", fontsize=8)
    fig.suptitle(wrapped, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def _list_patterns() -> int:
    from ..patterns import available_patterns, pattern_options

    for name in available_patterns():
        options = " ".join("--" + o.replace("_", "-") for o in pattern_options(name) if o not in CLI_HIDDEN_OPTIONS)
        print(f"{name:<24} {options}")
    return 0


def run(args: argparse.Namespace, extra: list[str]) -> int:
    """Build the layout, print stats, then a text picture or a PNG."""
    if args.list:
        return _list_patterns()
    pattern = _check_pattern(args.pattern)
    options = parse_pattern_options(pattern, extra)
    if args.seq_len is None:
        raise CliError("--seq-len", "is required (the sequence length in tokens)")
    layout = build_layout(pattern, seq_len=args.seq_len, seq_len_k=args.seq_len_k, block=args.block_size,
                          heads=args.heads, options=options)
    slices = layout.num_slices
    if args.head is not None:
        if args.head >= slices:
            raise CliError("--head", f"must be < {slices} (the layout has {slices} slice(s)), got {args.head}")
        heads = [args.head]
    else:
        heads = list(range(min(slices, 8)))
    title = args.title or f"{_describe(pattern, options)}, S={args.seq_len}, block {args.block_size[0]}"
    print(f"pattern      {_describe(pattern, options)}")
    print(_format_stats(layout_stats(layout)))
    if args.output:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CliError("--output", "needs matplotlib (pip install matplotlib); use --ascii instead") from None
        save_picture(layout, args.output, title=title + f"\ndensity {100 * layout.density:.1f}%",
                     heads=heads, max_cells=args.pixels)
        print(f"wrote        {args.output}")
        return 0
    for head in heads:
        grid = block_grid(layout, head, max_rows=args.width, max_cols=args.width)
        nqb, nkb = layout.num_query_blocks, layout.num_key_blocks
        scale = "" if grid.shape == (nqb, nkb) else (
            f", 1 cell = {math.ceil(nqb / grid.shape[0])}x{math.ceil(nkb / grid.shape[1])} blocks")
        label = f"head {head}: " if slices > 1 else ""
        print(f"\n{label}query blocks down, key blocks across{scale}")
        print(render_ascii(grid, cell_width=2 if 2 * grid.shape[1] <= args.width else 1))
    return 0
