"""``dilated-sparse bench``: time the op against the reference, dense SDPA and FlexAttention.

For each sequence length and pattern it times the forward (and with ``--backward`` the forward
plus backward) of:

* ``ours``: :func:`dilated_sparse.block_sparse_attention` over the pattern's layout;
* ``reference``: :func:`dilated_sparse.reference_attention` (dense definition), only where its
  ``B x H x S x S`` scores fit under ``--dense-limit-gib``;
* ``sdpa``: dense ``torch.nn.functional.scaled_dot_product_attention`` (once per length);
* ``flex``: FlexAttention with the same blocks (``layout.to_flex_block_mask()``), compiled on
  CUDA; on the CPU it runs uncompiled (it then builds dense scores, so the dense limit applies).

TFLOP/s count the work actually required: active blocks (``4 * pairs * D`` per forward, with
``pairs = nnz * block_q * block_k`` per head, less half the diagonal blocks when causal) for the
sparse paths and FlexAttention, ``Sq * Sk`` pairs (halved when
causal) for dense SDPA and the dense reference; forward + backward counts 3.5x the forward.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ._args import (
    CLI_HIDDEN_OPTIONS,
    DTYPES,
    CliError,
    block_size,
    device_name,
    dtype_name,
    non_negative_int,
    parse_value,
    positive_float,
    positive_int,
)

__all__ = ["ACCEPTS_PATTERN_OPTIONS", "BenchRow", "add_parser", "flex_kernel_options", "format_table",
           "parse_pattern_spec", "run", "run_bench", "write_plot"]

ACCEPTS_PATTERN_OPTIONS = False
IMPLS = ("ours", "reference", "sdpa", "flex")

#: Patterns timed by default (when registered), with options scaled to the sequence length.
_DEFAULT_PATTERNS: tuple[str, ...] = ("local_window", "dilated_sparse", "bigbird")


@dataclass
class BenchRow:
    """One timed (sequence length, pattern, implementation)."""

    impl: str
    pattern: str
    seq_len: int
    density: float
    fwd_ms: float | None = None
    fwd_tflops: float | None = None
    fwdbwd_ms: float | None = None
    fwdbwd_tflops: float | None = None
    status: str = "ok"
    extra: dict[str, Any] = field(default_factory=dict)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register the ``bench`` subcommand."""
    parser = sub.add_parser(
        "bench", help="time ours vs reference, dense SDPA and FlexAttention",
        description="Time block-sparse attention against the reference, dense SDPA and "
        "FlexAttention over sequence lengths and patterns; print a table, write JSON and a plot.",
        allow_abbrev=False,
    )
    parser.add_argument("--device", type=device_name, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--seq-len", type=positive_int, nargs="+", metavar="N",
                        help="sequence lengths (default: 512 1024 2048 on cpu, 2048..16384 on cuda)")
    parser.add_argument("--batch", type=positive_int, default=1, metavar="B", help="batch size (default 1)")
    parser.add_argument("--heads", type=positive_int, default=8, metavar="H", help="query heads (default 8)")
    parser.add_argument("--kv-heads", type=positive_int, metavar="HKV", help="key/value heads (default: --heads)")
    parser.add_argument("--head-dim", type=positive_int, default=64, metavar="D", help="head dim (default 64)")
    parser.add_argument("--dtype", type=dtype_name, help="float16, bfloat16, float32, float64 "
                        "(default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--block-size", type=block_size, default=(64, 64), metavar="B", help="block size (default 64)")
    parser.add_argument("--patterns", nargs="+", metavar="P",
                        help="patterns, each NAME or NAME:opt=value[:opt=value...] "
                        f"(default: {' '.join(_DEFAULT_PATTERNS)})")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS), metavar="IMPL",
                        help=f"implementations to time, of {', '.join(IMPLS)} (default: all)")
    parser.add_argument("--causal", action="store_true", help="causal attention")
    parser.add_argument("--backward", action="store_true", help="also time forward + backward")
    parser.add_argument("--warmup", type=non_negative_int, metavar="N", help="untimed runs (default 1 cpu, 5 cuda)")
    parser.add_argument("--repeats", type=positive_int, metavar="N", help="timed runs, median kept (default 3 cpu, 20 cuda)")
    parser.add_argument("--dense-limit-gib", type=positive_float, default=2.0, metavar="GIB",
                        help="skip paths that build dense S x S scores above this size (default 2)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default 0)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="plot time and TFLOP/s against length (matplotlib)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


# ------------------------------------------------------------------------- patterns
def parse_pattern_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``NAME[:opt=value[:opt=value...]]`` -> ``(name, options)``, checked against the registry."""
    from ..patterns import get_pattern, pattern_options

    name, *parts = spec.split(":")
    try:
        get_pattern(name)
    except (TypeError, ValueError) as error:
        raise CliError("--patterns", str(error)) from None
    valid = [option for option in pattern_options(name) if option not in CLI_HIDDEN_OPTIONS]
    options: dict[str, Any] = {}
    for part in parts:
        key, eq, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise CliError("--patterns", f"expected NAME:option=value, got {spec!r}")
        if key not in valid:
            raise CliError("--patterns", f"{key!r} is not an option of pattern {name!r}; its options: "
                           f"{', '.join(valid) or 'none'}")
        try:
            options[key] = parse_value(value)
        except CliError as error:
            raise CliError("--patterns", error.message) from None
    return name, options


def _default_options(name: str, seq_len: int, block: tuple[int, int]) -> dict[str, Any]:
    """Options that make the default patterns sensible at every length (about 10-25% dense)."""
    from ..patterns import pattern_options

    valid = set(pattern_options(name))
    unit = max(block)
    suggestions: dict[str, Any] = {
        "window_size": 2 * unit,
        "num_random_blocks": 1,
        "num_global_blocks": 1,
        "segment_lengths": [s for s in (4 * unit, 16 * unit, 64 * unit) if s <= max(seq_len, 4 * unit)],
    }
    if "segment_lengths" in valid:
        suggestions["dilation_rates"] = [1, 4, 16][: len(suggestions["segment_lengths"])]
    return {k: v for k, v in suggestions.items() if k in valid}


def _layout(name: str, options: dict[str, Any], seq_len: int, block: tuple[int, int], user_options: bool,
            causal: bool = False) -> Any:
    """The pattern's layout (default options scaled to the length unless the user gave options;
    ``causal=True`` for patterns that take it when the run is causal)."""
    from ..patterns import make_layout, pattern_options

    opts = dict(options) if user_options else {**_default_options(name, seq_len, block), **options}
    if causal and "causal" not in opts and "causal" in pattern_options(name):
        opts["causal"] = True
    try:
        return make_layout(name, seq_len_q=seq_len, block_size=block, **opts)
    except (TypeError, ValueError) as error:
        raise CliError("--patterns", f"pattern {name!r} at seq_len={seq_len}: {error}") from None


# -------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _fwd_bwd(forward: Callable[[], torch.Tensor], tensors: list[torch.Tensor]) -> Callable[[], None]:
    grad = None

    def step() -> None:
        nonlocal grad
        for t in tensors:
            t.grad = None
        out = forward()
        if grad is None:
            grad = torch.randn_like(out)
        out.backward(grad)

    return step


def _error_text(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if isinstance(error, torch.OutOfMemoryError) or "out of memory" in text.lower():
        return "error: out of memory"
    return f"error: {type(error).__name__}: {text[:160]}"


# ----------------------------------------------------------------------------- runs
@dataclass
class _Setup:
    device: torch.device
    dtype: torch.dtype
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool
    backward: bool
    warmup: int
    repeats: int
    dense_limit_bytes: float


def _measure(row: BenchRow, setup: _Setup, forward: Callable[..., torch.Tensor],
             tensors: list[torch.Tensor], flops: float) -> None:
    """Time ``forward(q, k, v)`` without autograd, then (``--backward``) forward + backward.

    A failure becomes the row's status; a forward time already taken is kept when only the
    backward fails (e.g. FlexAttention has no CPU backward).
    """
    inputs = [t.detach() for t in tensors]
    try:
        with torch.no_grad():
            row.fwd_ms = _median_ms(lambda: forward(*inputs), setup.device, setup.warmup, setup.repeats)
        row.fwd_tflops = flops / row.fwd_ms / 1e9
    except Exception as error:  # noqa: BLE001 - a failing path is a row, not the end of the run
        row.status = _error_text(error)
        return
    if not setup.backward:
        return
    try:
        step = _fwd_bwd(lambda: forward(*tensors), tensors)
        row.fwdbwd_ms = _median_ms(step, setup.device, setup.warmup, setup.repeats)
        row.fwdbwd_tflops = 3.5 * flops / row.fwdbwd_ms / 1e9
    except Exception as error:  # noqa: BLE001
        row.status = "backward " + _error_text(error)
    finally:
        for t in tensors:
            t.grad = None
        if setup.device.type == "cuda":
            torch.cuda.empty_cache()


def _inputs(setup: _Setup, seq_len: int, generator: torch.Generator):
    shape_q = (setup.batch, seq_len, setup.heads, setup.head_dim)
    shape_kv = (setup.batch, seq_len, setup.kv_heads, setup.head_dim)
    def make(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(setup.device, setup.dtype)

    q, k, v = make(shape_q), make(shape_kv), make(shape_kv)
    for t in (q, k, v):
        t.requires_grad_(setup.backward)
    return q, k, v


def _dense_bytes(setup: _Setup, seq_len: int) -> float:
    return 4.0 * setup.batch * setup.heads * seq_len * seq_len * 4  # fp32 scores, probs, mask, grads


def _flex_fn(setup: _Setup):
    from torch.nn.attention.flex_attention import flex_attention

    if setup.device.type == "cuda":
        return torch.compile(flex_attention, dynamic=False)
    return flex_attention


def _time_length(setup: _Setup, seq_len: int, patterns: list[tuple[str, dict[str, Any], bool]],
                 block: tuple[int, int], impls: list[str], generator: torch.Generator, flex: _FlexHolder,
                 tick: Callable[[str], None]) -> list[BenchRow]:
    """The rows of one sequence length (inputs made once, shared by every pattern)."""
    import dilated_sparse as ds

    tensors = list(_inputs(setup, seq_len, generator))
    batch, heads, dim = setup.batch, setup.heads, setup.head_dim
    gqa = setup.heads != setup.kv_heads
    dense_pairs = seq_len * seq_len * (0.5 if setup.causal else 1.0)
    dense_flops = 4.0 * batch * heads * dense_pairs * dim
    dense_ok = _dense_bytes(setup, seq_len) <= setup.dense_limit_bytes
    rows: list[BenchRow] = []
    if "sdpa" in impls:
        tick(f"S={seq_len} sdpa")
        row = BenchRow("sdpa", "dense", seq_len, 1.0)

        def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=setup.causal, enable_gqa=gqa,
            ).transpose(1, 2)

        _measure(row, setup, sdpa, tensors, dense_flops)
        rows.append(row)
    for name, options, user_options in patterns:
        layout = _layout(name, options, seq_len, block, user_options, setup.causal).to(setup.device)
        active_pairs = (layout.nnz * (batch // layout.layout_batch) * (heads // layout.layout_heads)
                        * layout.block_q * layout.block_k)
        if setup.causal:  # about half of each diagonal block is masked inside the kernel
            active_pairs -= 0.5 * min(layout.num_query_blocks, layout.num_key_blocks) * layout.block_q \
                * layout.block_k * batch * heads
        sparse_flops = 4.0 * max(active_pairs, 1.0) * dim
        label = name if not options else name + ":" + ":".join(f"{key}={val}" for key, val in options.items())
        ours_out: torch.Tensor | None = None
        for impl in impls:
            if impl == "sdpa":
                continue
            tick(f"S={seq_len} {name} {impl}")
            row = BenchRow(impl, label, seq_len, layout.density)
            if impl == "ours":
                if not ds.extension_available():
                    row.status = "skipped: extension not available"
                else:
                    def ours(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Any = layout) -> torch.Tensor:
                        return ds.block_sparse_attention(q, k, v, layout, causal=setup.causal)

                    _measure(row, setup, ours, tensors, sparse_flops)
                    if row.fwd_ms is not None:
                        with torch.no_grad():
                            ours_out = ours(*(t.detach() for t in tensors))
            elif impl == "reference":
                if not dense_ok:
                    row.status = "skipped: dense scores above --dense-limit-gib"
                else:
                    def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  layout: Any = layout) -> torch.Tensor:
                        return ds.reference_attention(q, k, v, layout, causal=setup.causal)

                    _measure(row, setup, reference, tensors, dense_flops)
                    _compare(row, reference, ours_out, tensors)
            elif impl == "flex":
                flex_forward = _run_flex(row, setup, layout, tensors, sparse_flops, dense_ok, gqa, flex.get(setup))
                _compare(row, flex_forward, ours_out, tensors)
            rows.append(row)
        del ours_out
    return rows


class _FlexHolder:
    """FlexAttention, looked up (and compiled on CUDA) on first use; None when missing."""

    def __init__(self) -> None:
        self._done = False
        self._fn: Callable[..., torch.Tensor] | None = None

    def get(self, setup: _Setup) -> Callable[..., torch.Tensor] | None:
        if not self._done:
            self._done = True
            self._fn = _try_flex(setup)
        return self._fn


def run_bench(setup: _Setup, seq_lens: list[int], patterns: list[tuple[str, dict[str, Any], bool]],
              block: tuple[int, int], impls: list[str], progress: bool, seed: int) -> list[BenchRow]:
    """Time every (length, pattern, impl); returns the rows (failures are rows with a status).

    A ``tqdm`` progress bar (on stderr) counts the timed runs when tqdm is installed and
    ``progress`` is true.
    """
    try:
        from tqdm.auto import tqdm
    except ImportError:  # optional extra
        tqdm = None
    per_len = ("sdpa" in impls) + len(patterns) * sum(i != "sdpa" for i in impls)
    bar = None
    if tqdm is not None and progress:
        bar = tqdm(total=per_len * len(seq_lens), desc="bench", unit="run", file=sys.stderr, leave=False)
    started = [False]

    def tick(label: str) -> None:
        if bar is None:
            return
        if started[0]:
            bar.update()
        started[0] = True
        bar.set_postfix_str(label, refresh=False)

    rows: list[BenchRow] = []
    generator = torch.Generator().manual_seed(seed)
    flex = _FlexHolder()
    try:
        for seq_len in seq_lens:
            rows += _time_length(setup, seq_len, patterns, block, impls, generator, flex, tick)
    finally:
        if bar is not None:
            bar.update()
            bar.close()
    return rows


def _try_flex(setup: _Setup):
    try:
        return _flex_fn(setup)
    except Exception:  # noqa: BLE001 - FlexAttention missing in this torch
        return None


def flex_kernel_options(block_q: int, block_k: int) -> dict[str, int] | None:
    """Tile sizes that divide our blocks, for compiled FlexAttention (older torch versions do not
    shrink their default 128-wide tiles to smaller sparse blocks and refuse to compile)."""
    if block_q >= 128 and block_k >= 128:
        return None
    n1, m2 = min(block_k, 128), min(block_q, 128)
    return {
        "BLOCK_M": min(block_q, 128), "BLOCK_N": min(block_k, 128),
        "BLOCK_M1": min(block_q, 64, n1), "BLOCK_N1": n1, "BLOCK_M2": m2, "BLOCK_N2": min(block_k, 64, m2),
    }


def _run_flex(row: BenchRow, setup: _Setup, layout: Any, tensors: list[torch.Tensor], flops: float, dense_ok: bool,
              gqa: bool, flex_fn: Callable[..., torch.Tensor] | None) -> Callable[..., torch.Tensor] | None:
    """Time FlexAttention over ``layout``; returns the forward function (None when not run)."""
    if flex_fn is None:
        row.status = "skipped: FlexAttention not available"
        return None
    if setup.device.type != "cuda" and not dense_ok:
        row.status = "skipped: uncompiled FlexAttention (cpu) builds dense scores above --dense-limit-gib"
        return None
    try:
        block_mask = layout.to_flex_block_mask(causal=setup.causal)
    except Exception as error:  # noqa: BLE001 - reported in the row
        row.status = _error_text(error)
        return None

    options = flex_kernel_options(layout.block_q, layout.block_k) if setup.device.type == "cuda" else None

    def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return flex_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                       enable_gqa=gqa, kernel_options=options).transpose(1, 2)

    if setup.device.type == "cpu" and setup.backward:
        row.extra["note"] = "FlexAttention has no CPU backward: forward only"
        setup = dataclasses.replace(setup, backward=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        _measure(row, setup, flex, tensors, flops)
    return flex


def _compare(row: BenchRow, fn: Callable[..., torch.Tensor] | None, expected: torch.Tensor | None,
             tensors: list[torch.Tensor]) -> None:
    """Record the largest difference between ``fn``'s output and ours in ``row.extra``."""
    if fn is None or expected is None or row.fwd_ms is None:
        return
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = fn(*(t.detach() for t in tensors))
        row.extra["max_abs_diff_vs_ours"] = float((out.float() - expected.float()).abs().max())
    except Exception as error:  # noqa: BLE001
        row.extra["max_abs_diff_vs_ours"] = None
        row.extra["compare_error"] = _error_text(error)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(rows: list[BenchRow], backward: bool) -> str:
    """A plain-text table of the rows (``vs ours``: largest absolute difference from our output)."""
    width = max([len(r.pattern) for r in rows] + [7])
    header = f"{'seq_len':>8}  {'pattern':<{width}}  {'density':>7}  {'impl':<9}  {'fwd ms':>10}  {'TFLOP/s':>8}"
    if backward:
        header += f"  {'fwd+bwd ms':>10}  {'TFLOP/s':>8}"
    header += f"  {'vs ours':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        line = (f"{r.seq_len:>8}  {r.pattern:<{width}}  {100 * r.density:>6.1f}%  {r.impl:<9}  "
                f"{_fmt(r.fwd_ms):>10}  {_fmt(r.fwd_tflops, 4):>8}")
        if backward:
            line += f"  {_fmt(r.fwdbwd_ms):>10}  {_fmt(r.fwdbwd_tflops, 4):>8}"
        diff = r.extra.get("max_abs_diff_vs_ours")
        line += f"  {'-' if diff is None else f'{diff:.1e}':>8}"
        if r.status != "ok":
            line += f"  [{r.status}]"
        elif r.extra.get("note"):
            line += f"  [{r.extra['note']}]"
        lines.append(line)
    return "\n".join(lines)


def write_plot(rows: list[BenchRow], path: str, title: str, backward: bool) -> None:
    """Time (ms) and TFLOP/s against sequence length, one line per (impl, pattern)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key_ms, key_tf = ("fwdbwd_ms", "fwdbwd_tflops") if backward else ("fwd_ms", "fwd_tflops")
    series: dict[str, list[BenchRow]] = {}
    for r in rows:
        if getattr(r, key_ms) is not None:
            series.setdefault(f"{r.impl} / {r.pattern}", []).append(r)
    fig, (ax_t, ax_f) = plt.subplots(1, 2, figsize=(10, 4))
    for label, items in series.items():
        items.sort(key=lambda r: r.seq_len)
        xs = [r.seq_len for r in items]
        style = "--" if label.startswith(("sdpa", "reference")) else "-"
        ax_t.plot(xs, [getattr(r, key_ms) for r in items], style, marker="o", label=label)
        ax_f.plot(xs, [getattr(r, key_tf) for r in items], style, marker="o", label=label)
    for ax, ylabel in ((ax_t, "time (ms)"), (ax_f, "TFLOP/s (required work)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    ax_t.set_yscale("log")
    ax_f.legend(fontsize=7, loc="best")
    fig.suptitle(title + (" (forward + backward)" if backward else " (forward)"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run(args: argparse.Namespace, extra: list[str]) -> int:
    """Check the options, run, print the table and write JSON / plot."""
    import dilated_sparse as ds

    device_text = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_text.startswith("cuda") and not torch.cuda.is_available():
        raise CliError("--device", "cuda requested but CUDA is not available on this machine")
    device = torch.device(device_text)
    on_cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bfloat16" if on_cuda else "float32")]
    if on_cuda and dtype == torch.float64:
        raise CliError("--dtype", "float64 runs on the cpu only")
    kv_heads = args.kv_heads or args.heads
    if args.heads % kv_heads:
        raise CliError("--kv-heads", f"--heads ({args.heads}) must be a multiple of --kv-heads ({kv_heads})")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CliError("--plot", "needs matplotlib (pip install matplotlib)") from None
    seq_lens = args.seq_len or ([2048, 4096, 8192, 16384] if on_cuda else [512, 1024, 2048])
    if args.patterns:
        patterns = [(*parse_pattern_spec(p), ":" in p) for p in args.patterns]
    else:
        from ..patterns import available_patterns

        known = set(available_patterns())
        patterns = [(name, {}, False) for name in _DEFAULT_PATTERNS if name in known]
        if not patterns:
            raise CliError("--patterns", f"no default pattern is registered; choose from {', '.join(sorted(known))}")
    for name, options, user in patterns:  # fail fast on bad options, before any timing
        _layout(name, options, seq_lens[0], args.block_size, user, args.causal)
    setup = _Setup(
        device=device, dtype=dtype, batch=args.batch, heads=args.heads, kv_heads=kv_heads,
        head_dim=args.head_dim, causal=args.causal, backward=args.backward,
        warmup=args.warmup if args.warmup is not None else (5 if on_cuda else 1),
        repeats=args.repeats or (20 if on_cuda else 3),
        dense_limit_bytes=args.dense_limit_gib * 2**30,
    )
    if "ours" in args.impls and not ds.extension_available():
        print("bench: the extension is not available; 'ours' rows are skipped (see `dilated-sparse info`)",
              file=sys.stderr)
    rows = run_bench(setup, seq_lens, patterns, args.block_size, list(args.impls),
                     progress=not args.no_progress, seed=args.seed)
    title = (f"{_device_label(device)}, {str(dtype).removeprefix('torch.')}, B={setup.batch} H={setup.heads} "
             f"Hkv={kv_heads} D={setup.head_dim}, block {args.block_size[0]}x{args.block_size[1]}"
             f"{', causal' if setup.causal else ''}")
    print(title)
    print(format_table(rows, setup.backward))
    if args.json:
        payload = {
            "device": _device_label(device),
            "torch": torch.__version__,
            "dilated_sparse": ds.__version__,
            "config": {"dtype": str(dtype).removeprefix("torch."), "batch": setup.batch, "heads": setup.heads,
                       "kv_heads": kv_heads, "head_dim": setup.head_dim, "block_size": list(args.block_size),
                       "causal": setup.causal, "backward": setup.backward, "warmup": setup.warmup,
                       "repeats": setup.repeats},
            "rows": [asdict(r) for r in rows],
        }
        with open(args.json, "w") as fh:
            json.dump(payload, fh, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        write_plot(rows, args.plot, title, setup.backward)
        print(f"wrote {args.plot}")
    failed = [r for r in rows if r.impl == "ours" and "error" in r.status]
    return 1 if failed else 0

