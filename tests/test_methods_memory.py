"""No S x S tensor at S = 16384 on the chunked / blocked / kernel paths of the methods.

Two measurements:
* a ``TorchDispatchMode`` records the largest storage any op allocates, forward and backward; an
  ``S x S`` float32 tensor at ``S = 16384`` is 1 GiB, the assertion allows 1/16 of it (the
  row-wise normalisers that share the dense-chunk driver, whose ``S x S`` compute is too slow for
  CI at 16384, are checked at ``S = 2048`` against their chunk bound instead);
* a subprocess measures the peak resident memory (``ru_maxrss``) of the top-k forward+backward
  (the dense-chunked path) above its baseline: under half of one ``S x S`` float32 tensor.
A control shows the mode does see an ``S x S`` score matrix when one is made.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import dilated_sparse as ds
from dilated_sparse import methods as M

pytestmark = pytest.mark.usefixtures("single_thread")


S = 16384
SXS_BYTES = S * S * 4  # one float32 S x S tensor
LIMIT = SXS_BYTES // 16


class LargestAllocation(TorchDispatchMode):
    """Records the largest storage (bytes) among the outputs of every dispatched op."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.op = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                size = t.untyped_storage().nbytes()
                if size > self.largest:
                    self.largest, self.op = size, func
        return out


def _inputs(seq: int, heads: int = 1, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, seq, heads, dim, generator=g).requires_grad_() for _ in range(3)]


def _measure(fn, seq: int = S, backward: bool = True) -> int:
    q, k, v = _inputs(seq)
    with LargestAllocation() as mode:
        out = fn(q, k, v)
        if backward:
            out.float().square().mean().backward()
    assert torch.isfinite(out).all()
    if backward:
        assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
    return mode.largest


def test_mode_sees_a_dense_score_matrix():
    seq = 1024
    largest = _measure(lambda q, k, v: torch.softmax(q[:, :, 0] @ k[:, :, 0].transpose(-1, -2), -1) @ v[:, :, 0], seq)
    assert largest >= seq * seq * 4


CHUNKED = {  # the dense-chunked top-k path is measured in a subprocess below (with its peak RSS)
    "entmax_layout_blocks": lambda q, k, v: M.entmax_attention(
        q, k, v, 1.5, ds.patterns.block_neighbour(seq_len_q=S, block_size=64), n_iter=20),
    "lsh_chunks": lambda q, k, v: M.lsh_attention(q, k, v, n_buckets=16, chunk_size=64),
}
KERNEL = {
    "block_topk": lambda q, k, v: M.block_topk_attention(q, k, v, 4, 64, causal=True),
    "bigbird": lambda q, k, v: M.bigbird_attention(q, k, v, block_size=64, num_random_blocks=2),
    "block_neighbour": lambda q, k, v: M.block_neighbour_attention(q, k, v, block_size=64),
    "sla": lambda q, k, v: M.sla_attention(q, k, v, block_size=64, critical_fraction=0.02),
}


@pytest.mark.parametrize("name", sorted(CHUNKED))
def test_chunked_paths_allocate_no_sxs(name):
    largest = _measure(CHUNKED[name])
    assert largest < LIMIT, f"{name}: largest allocation {largest / 2**20:.1f} MiB"


ROWWISE = {  # the shared dense-chunk driver, with 32-query chunks: O(32 x S), never S x S
    "rela": lambda q, k, v: M.rela_attention(q, k, v, causal=True, chunk_size=32),
    "entmax": lambda q, k, v: M.entmax_attention(q, k, v, 1.5, causal=True, chunk_size=32, n_iter=20),
    "sparsemax": lambda q, k, v: M.sparsemax_attention(q, k, v, causal=True, chunk_size=32),
    "gumbel": lambda q, k, v: M.gumbel_softmax_attention(q, k, v, 0.5, causal=True, chunk_size=32),
    "sparsek": lambda q, k, v: M.sparsek_attention(q, k, v, k[..., 0], 8, causal=True, chunk_size=32),
    "gated": lambda q, k, v: M.block_gated_attention(q, k, v, torch.ones(1, 32, 32), 64, causal=True, chunk_size=32),
    "topk_layout": lambda q, k, v: M.topk_attention(q, k, v, 8, layout=M.block_topk_layout(q, k, 4, 64), chunk_size=2),
}


@pytest.mark.parametrize("name", sorted(ROWWISE))
def test_rowwise_driver_allocates_chunk_not_sxs(name):
    """At S = 2048 (S x S = 16 MiB) every allocation stays within a few 32 x S chunks (0.25 MiB each)."""
    seq = 2048
    largest = _measure(ROWWISE[name], seq)
    assert largest <= 4 * 32 * seq * 4, f"{name}: largest allocation {largest / 2**20:.2f} MiB"


@pytest.mark.needs_op
@pytest.mark.parametrize("name", sorted(KERNEL))
def test_kernel_paths_allocate_no_sxs(name):
    largest = _measure(KERNEL[name])
    assert largest < LIMIT, f"{name}: largest allocation {largest / 2**20:.1f} MiB"


@pytest.mark.needs_op
def test_metrics_on_weights_dict_allocate_no_sxs():
    q, k, v = (t.detach() for t in _inputs(S))
    layout = ds.patterns.block_neighbour(seq_len_q=S, block_size=64)
    _, weights = ds.block_sparse_attention(q, k, v, layout, return_attention_weights=True)
    with LargestAllocation() as mode:
        summary = M.attention_metrics(weights)
    assert mode.largest < LIMIT
    assert summary["empty_rows"] == 0 and 0.98 < summary["sparsity"] < 1.0


_RSS_SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from dilated_sparse.methods import topk_attention

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                    self.largest = max(self.largest, t.untyped_storage().nbytes())
            return out

    torch.manual_seed(0)
    S = int(sys.argv[1])
    q, k, v = (torch.randn(1, S, 1, 16).requires_grad_() for _ in range(3))
    topk_attention(q[:, :256], k[:, :256], v[:, :256], 8).sum().backward()  # warm up allocator/kernels
    q.grad = k.grad = v.grad = None
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with Largest() as mode:
        out = topk_attention(q, k, v, 8, causal=True, chunk_size=256)
        out.square().mean().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all() and k.grad.abs().sum() > 0
    print((peak - base) * 1024, mode.largest)
    """
)


def test_topk_dense_chunks_no_sxs_and_peak_rss():
    """Top-k over query chunks at S = 16384, forward + backward: largest allocation and peak RSS."""
    # A fixed mmap threshold makes glibc hand freed large blocks back to the OS, so the peak RSS
    # tracks live tensors (with its default dynamic threshold, freed chunk buffers stay resident).
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    root = os.path.dirname(os.path.dirname(os.path.abspath(ds.__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(S)], capture_output=True, text=True, env=env,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    grown, largest = (int(x) for x in result.stdout.strip().splitlines()[-1].split())
    assert largest < LIMIT, f"largest allocation {largest / 2**20:.1f} MiB"
    assert grown < SXS_BYTES // 2, f"peak RSS grew by {grown / 2**20:.0f} MiB (S x S float32 = 1024 MiB)"
