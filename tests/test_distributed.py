"""Distributed block-sparse ring attention: spawned gloo process groups (2, 3, 4 ranks) on the CPU.

Every case runs the ring on each rank's shard and compares values and the gradients of q, k and v
with the single-process op on the whole sequence (computed on every rank from the same seed).
One spawn per world size runs all cases (so the whole file stays within a few minutes on 2 cores);
each case's maximum errors come back in a JSON file per rank and are asserted per case here.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import math
import os
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dilated_sparse as ds
import dilated_sparse.configs
import dilated_sparse.patterns as pat
from dilated_sparse.distributed import (
    BlockSparseRingDistributedDilatedAttention,
    CommunicationLog,
    DistributedSparseConfig,
    balanced_sharding,
    build_plan,
    contiguous_sharding,
    get_ring_plan,
    make_sharding,
    merge_partials,
    redistribution_plan,
    ring_block_sparse_attention,
    track_communication,
    zigzag_sharding,
)

pytestmark = pytest.mark.needs_op

WORLD_SIZES = (2, 3, 4)
TOL64 = 1e-9
TOL32 = 2e-5
TOL16 = 3e-2


# --------------------------------------------------------------------------------- helpers
def _tensors(b: int, s: int, h: int, hkv: int, d: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(b, s, h, d), (b, s, hkv, d), (b, s, hkv, d), (b, s, h, d)]
    return [torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype) for shape in shapes]


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0 and b.numel() == 0:
        return 0.0
    return float((a.detach().double() - b.detach().double()).abs().max())


def _compare_ring(
    rank: int,
    world: int,
    layout: ds.BlockSparseLayout,
    *,
    heads: int = 4,
    kv_heads: int = 2,
    dim: int = 8,
    batch: int = 2,
    dtype: torch.dtype = torch.float64,
    causal: bool = False,
    window: Any = None,
    key_lengths: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    sharding: str = "contiguous",
    keep_remote_kv: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Max abs errors of out, dq, dk, dv of this rank's shard vs the single-process op."""
    s = layout.seq_len_q
    q, k, v, dout = _tensors(batch, s, heads, kv_heads, dim, dtype, seed)
    qf, kf, vf = (t.clone().requires_grad_() for t in (q, k, v))
    ref = ds.block_sparse_attention(qf, kf, vf, layout, causal=causal, window=window, key_lengths=key_lengths,
                                    key_padding_mask=key_padding_mask)
    ref.backward(dout)
    win = ds.ops._normalize_window(window)
    shard = make_sharding(sharding, layout, world, causal=causal, window=win)
    ql, kl, vl = (shard.split(t, rank).clone().requires_grad_() for t in (q, k, v))
    kpm = None if key_padding_mask is None else shard.split(key_padding_mask, rank, dim=1)
    with track_communication() as log:
        out = ring_block_sparse_attention(ql, kl, vl, layout, causal=causal, window=window, key_lengths=key_lengths,
                                          key_padding_mask=kpm, sharding=shard, keep_remote_kv=keep_remote_kv)
        out.backward(shard.split(dout, rank))
    plan = get_ring_plan(layout, shard, rank, causal=causal, window=win)
    expect = plan.communication(batch=batch, kv_heads=kv_heads, head_dim=dim, element_size=q.element_size(),
                                key_padding_mask=kpm is not None, keep_remote_kv=keep_remote_kv)
    return {
        "out": _max_err(out, shard.split(ref, rank)),
        "dq": _max_err(ql.grad, shard.split(qf.grad, rank)),
        "dk": _max_err(kl.grad, shard.split(kf.grad, rank)),
        "dv": _max_err(vl.grad, shard.split(vf.grad, rank)),
        "finite": bool(torch.isfinite(out).all() and torch.isfinite(ql.grad).all()),
        "tokens": ql.shape[1],
        "log": {k2: getattr(log, k2) for k2 in ("forward_sent", "forward_received", "backward_sent",
                                                 "backward_received")},
        "expect": expect,
    }


# ------------------------------------------------------------------------------ the cases
S = 200  # not a multiple of the block: the tail block is partial


def case_local_gqa(rank: int, world: int) -> dict[str, Any]:
    return _compare_ring(rank, world, pat.local_window(seq_len_q=S, block_size=16, window_size=48))


def case_local_causal(rank: int, world: int) -> dict[str, Any]:
    return _compare_ring(rank, world, pat.local_window(seq_len_q=S, block_size=16, window_size=64), causal=True)


def case_dense_causal_zigzag(rank: int, world: int) -> dict[str, Any]:
    return _compare_ring(rank, world, pat.dense(seq_len_q=S, block_size=16), causal=True, sharding="zigzag")


def case_dilated_per_head(rank: int, world: int) -> dict[str, Any]:
    layout = pat.dilated_sparse(seq_len_q=S, block_size=16, segment_lengths=[64, 128], dilation_rates=[1, 2],
                                num_heads=4, different_layout_per_head=True)
    assert layout.layout_heads == 4
    return _compare_ring(rank, world, layout)


def case_global_local_causal_balanced(rank: int, world: int) -> dict[str, Any]:
    layout = pat.global_local(seq_len_q=S, block_size=16, global_tokens=20, window_size=48)
    return _compare_ring(rank, world, layout, causal=True, sharding="balanced")


def case_window_keylen_zigzag(rank: int, world: int) -> dict[str, Any]:
    # token windows whose edges fall on remote blocks: exercises the tile calls of the plan
    layout = pat.local_window(seq_len_q=S, block_size=16, window_size=80)
    return _compare_ring(rank, world, layout, window=(21, 7), key_lengths=torch.tensor([150, 37]),
                         sharding="zigzag")


def case_kpm_mqa_causal_window(rank: int, world: int) -> dict[str, Any]:
    layout = pat.local_window(seq_len_q=S, block_size=16, window_size=96)
    g = torch.Generator().manual_seed(5)
    kpm = torch.rand(2, S, generator=g) < 0.3
    kpm[:, :3] = True  # left padding too
    return _compare_ring(rank, world, layout, kv_heads=1, causal=True, window=(30, None), key_padding_mask=kpm)


def case_per_batch_layout(rank: int, world: int) -> dict[str, Any]:
    layout = pat.per_batch([("local_window", {"window_size": 32}), ("random", {"sparsity_ratio": 0.6})],
                           seq_len_q=S, block_size=16, seed=3)
    assert layout.layout_batch == 2
    return _compare_ring(rank, world, layout, heads=2, kv_heads=2)


def case_empty_shards(rank: int, world: int) -> dict[str, Any]:
    # fewer block units than ranks: the last rank holds no tokens and still takes part
    seq = 16 * (world - 1) - 5
    layout = pat.dense(seq_len_q=seq, block_size=16)
    result = _compare_ring(rank, world, layout, causal=True)
    result["expect_tokens"] = contiguous_sharding(seq, world, 16).local_length(rank)
    return result


def case_idle_rank(rank: int, world: int) -> dict[str, Any]:
    # only the first query blocks have rows: later ranks compute nothing but serve their keys
    seq = 16 * 2 * world
    nqb = seq // 16
    rows = torch.tensor([r for r in range(2) for _ in range(nqb)])
    cols = torch.tensor([c for _ in range(2) for c in range(nqb)])
    layout = ds.BlockSparseLayout.from_coo(rows, cols, block_size=16, seq_len_q=seq, seq_len_k=seq)
    return _compare_ring(rank, world, layout, heads=2, kv_heads=2)


def case_keep_remote_kv(rank: int, world: int) -> dict[str, Any]:
    layout = pat.local_window(seq_len_q=S, block_size=16, window_size=48)
    return _compare_ring(rank, world, layout, causal=True, keep_remote_kv=True)


def case_fp32_rect_blocks(rank: int, world: int) -> dict[str, Any]:
    layout = pat.local_window(seq_len_q=300, block_size=(32, 16), window_size=96)
    return _compare_ring(rank, world, layout, dtype=torch.float32, causal=True, sharding="zigzag")


def case_bf16_local_causal(rank: int, world: int) -> dict[str, Any]:
    # partial results are rounded to bf16 before the lse merge: bf16 tolerance
    layout = pat.local_window(seq_len_q=S, block_size=16, window_size=64)
    return _compare_ring(rank, world, layout, dtype=torch.bfloat16, causal=True, sharding="zigzag")


def _module_case(rank: int, world: int, module: BlockSparseRingDistributedDilatedAttention, seq: int,
                 causal: bool, steps: int, layout_of: Callable[[], ds.BlockSparseLayout]) -> dict[str, Any]:
    errors: dict[str, float] = {"out": 0.0, "dq": 0.0, "dk": 0.0, "dv": 0.0}
    sharding_steps = []
    input_split = contiguous_sharding(seq, world, module.block_size)
    for step in range(steps):
        q, k, v, dout = _tensors(2, seq, 4, 2, 8, torch.float64, seed=step)
        ql, kl, vl = (input_split.split(t, rank).clone().requires_grad_() for t in (q, k, v))
        out = module(ql, kl, vl, is_causal=causal)
        out.backward(input_split.split(dout, rank))
        layout = layout_of()
        qf, kf, vf = (t.clone().requires_grad_() for t in (q, k, v))
        ref = ds.block_sparse_attention(qf, kf, vf, layout, causal=causal, window=module.window)
        ref.backward(dout)
        for name, a, b in (("out", out, ref), ("dq", ql.grad, qf.grad), ("dk", kl.grad, kf.grad),
                           ("dv", vl.grad, vf.grad)):
            errors[name] = max(errors[name], _max_err(a, input_split.split(b, rank)))
        entry = next(iter(module._shardings.values()), None)
        sharding_steps.append(None if entry is None else entry[1])
    return {**errors, "sharding_steps": sharding_steps, "finite": True}


def case_module_zigzag_redistribute(rank: int, world: int) -> dict[str, Any]:
    cfg = DistributedSparseConfig(sharding="zigzag", record_communication=True, check_layout_consistency=True)
    module = BlockSparseRingDistributedDilatedAttention(pattern="local_window", window_size=64, block_size=16,
                                                        distributed_config=cfg)
    result = _module_case(rank, world, module, S, True, 1, lambda: module.current_layout(S, 4))
    result["redistributed"] = module.communication.redistribution_sent + module.communication.redistribution_received
    result["ring_bytes"] = module.communication.forward_received + module.communication.backward_sent
    return result


def case_module_dynamic_balanced(rank: int, world: int) -> dict[str, Any]:
    # a callable pattern that differs per rank and per call: rank 0's layout is broadcast
    calls = {"n": 0}

    def random_layout(*, seq_len_q: int, seq_len_k: int | None, block_size: Any) -> ds.BlockSparseLayout:
        calls["n"] += 1
        return pat.random_pattern(seq_len_q=seq_len_q, block_size=block_size, sparsity_ratio=0.5,
                                  seed=1000 * rank + calls["n"])

    cfg = DistributedSparseConfig(sharding="balanced", load_balance_interval=2, pattern_update_interval=1,
                                  check_layout_consistency=True)
    module = BlockSparseRingDistributedDilatedAttention(pattern=random_layout, block_size=16, distributed_config=cfg,
                                                        window=(40, 40))
    seq = 176
    result = _module_case(rank, world, module, seq, False, 3, lambda: module.current_layout(seq, 4))
    result["builds"] = calls["n"]
    return result


def case_module_compute_input(rank: int, world: int) -> dict[str, Any]:
    # the caller already holds the compute split: nothing is redistributed
    seq = S
    cfg = DistributedSparseConfig(sharding="zigzag", input_sharding="compute", record_communication=True)
    sparse = ds.configs.SparsePatternConfig(pattern_type="local_window", local_window_size=48, block_size=16)
    module = BlockSparseRingDistributedDilatedAttention(sparse_config=sparse, distributed_config=cfg)
    q, k, v, dout = _tensors(2, seq, 4, 2, 8, torch.float64, seed=9)
    split = module.current_sharding(seq, 4, causal=True)
    assert split.segments == zigzag_sharding(seq, world, 16).segments
    ql, kl, vl = (split.split(t, rank).clone().requires_grad_() for t in (q, k, v))
    out = module(ql, kl, vl, is_causal=True, seq_len=seq)
    out.backward(split.split(dout, rank))
    layout = module.current_layout(seq, 4)
    qf, kf, vf = (t.clone().requires_grad_() for t in (q, k, v))
    ref = ds.block_sparse_attention(qf, kf, vf, layout, causal=True)
    ref.backward(dout)
    return {
        "out": _max_err(out, split.split(ref, rank)),
        "dq": _max_err(ql.grad, split.split(qf.grad, rank)),
        "dk": _max_err(kl.grad, split.split(kf.grad, rank)),
        "dv": _max_err(vl.grad, split.split(vf.grad, rank)),
        "finite": True,
        "redistributed": module.communication.redistribution_sent,
    }


CASES: dict[str, Callable[[int, int], dict[str, Any]]] = {
    name[len("case_"):]: fn for name, fn in sorted(globals().items()) if name.startswith("case_")
}
TOLERANCES = {"fp32_rect_blocks": TOL32, "bf16_local_causal": TOL16}


# ----------------------------------------------------------------------------- spawning
def _worker(rank: int, world: int, init_file: str, out_dir: str, names: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=90))
    results: dict[str, Any] = {}
    try:
        for name in names:
            try:
                results[name] = CASES[name](rank, world)
            except Exception:  # noqa: BLE001 - reported per case by the parent
                results[name] = {"error": traceback.format_exc()}
                break  # the group may be out of step now: stop here
            dist.barrier()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


_RESULTS: dict[int, list[dict[str, Any]]] = {}


def _spawn(world: int, names: list[str], worker: Callable[..., None] = _worker) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(worker, args=(world, init_file, tmp, names), nprocs=world, join=True)
        out = []
        for rank in range(world):
            with open(os.path.join(tmp, f"rank{rank}.json")) as f:
                out.append(json.load(f))
        return out


def _results(world: int) -> list[dict[str, Any]]:
    if world not in _RESULTS:
        _RESULTS[world] = _spawn(world, list(CASES))
    return _RESULTS[world]


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("world", WORLD_SIZES)
def test_ring_matches_single_process(world: int, name: str) -> None:
    per_rank = _results(world)
    tol = TOLERANCES.get(name, TOL64)
    for rank, results in enumerate(per_rank):
        assert name in results, f"rank {rank}: case {name} did not run (an earlier case failed)"
        r = results[name]
        assert "error" not in r, f"rank {rank}:\n{r['error']}"
        for key in ("out", "dq", "dk", "dv"):
            assert r[key] <= tol, f"rank {rank} {name}: {key} differs by {r[key]:.3g}"
        assert r["finite"]
        if "log" in r:
            log, expect = r["log"], r["expect"]
            for key in ("forward_sent", "forward_received", "backward_sent", "backward_received"):
                assert log[key] == expect[key], f"rank {rank} {name}: {key} {log[key]} != plan {expect[key]}"
        if "expect_tokens" in r:
            assert r["tokens"] == r["expect_tokens"]
    if name == "empty_shards":
        assert per_rank[-1][name]["tokens"] == 0
    if name == "local_gqa":
        # a local pattern fetches only neighbour blocks: strictly less than a full ring on every rank
        for r in per_rank:
            assert r[name]["log"]["forward_received"] < r[name]["expect"]["full_ring_forward_received"]
    if name == "idle_rank":
        for rank in range(1, world):
            assert per_rank[rank][name]["log"]["forward_received"] == 0
            assert per_rank[rank][name]["log"]["forward_sent"] > 0
    if name == "module_zigzag_redistribute":
        assert all(r[name]["redistributed"] > 0 for r in per_rank[:1])
    if name == "module_compute_input":
        assert all(r[name]["redistributed"] == 0 for r in per_rank)
    if name == "module_dynamic_balanced":
        for r in per_rank:
            assert r[name]["sharding_steps"] == [0, 0, 2]  # re-split at step 2, kept at step 1
        assert per_rank[0][name]["builds"] == 3  # rebuilt on every call (pattern_update_interval=1) on rank 0
        assert all(r[name]["builds"] == 0 for r in per_rank[1:])  # other ranks receive it


# ------------------------------------------------------------------------------ DeepSpeed
class _SequenceParallelMPU:
    """The part of a Megatron-style ``mpu`` DeepSpeed asks for its sequence-parallel group."""

    def __init__(self, group: Any, size: int, rank: int) -> None:
        self.group, self.size, self.rank = group, size, rank

    def get_sequence_parallel_group(self) -> Any:
        return self.group

    def get_sequence_parallel_world_size(self) -> int:
        return self.size

    def get_sequence_parallel_rank(self) -> int:
        return self.rank


def _deepspeed_worker(rank: int, world: int, init_file: str, out_dir: str, names: list[str]) -> None:
    torch.set_num_threads(1)
    result: dict[str, Any] = {}
    try:
        import deepspeed
        from deepspeed.utils import groups

        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=90))
        assert deepspeed.__version__
        # two sequence-parallel groups {0, 1} and {2, 3}, handed to DeepSpeed as deepspeed.initialize(mpu=...)
        # does (deepspeed.init_distributed is not called: on the CPU it JIT-builds a shared-memory op)
        sp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        mine = sp_groups[rank // 2]
        groups.mpu = _SequenceParallelMPU(mine, 2, rank % 2)
        cfg = DistributedSparseConfig(enable_deepspeed_integration=True)
        module = BlockSparseRingDistributedDilatedAttention(pattern="local_window", window_size=32, block_size=16,
                                                            distributed_config=cfg)
        seq = 96
        q, k, v, dout = _tensors(1, seq, 2, 2, 8, torch.float64, seed=rank // 2)
        split = contiguous_sharding(seq, 2, 16)
        sp_rank = rank % 2
        ql, kl, vl = (split.split(t, sp_rank).clone().requires_grad_() for t in (q, k, v))
        out = module(ql, kl, vl, is_causal=True)
        out.backward(split.split(dout, sp_rank))
        qf, kf, vf = (t.clone().requires_grad_() for t in (q, k, v))
        ref = ds.block_sparse_attention(qf, kf, vf, module.current_layout(seq, 2), causal=True)
        ref.backward(dout)
        result = {
            "group_is_sp": module.process_group() is mine,
            "out": _max_err(out, split.split(ref, sp_rank)),
            "dk": _max_err(kl.grad, split.split(kf.grad, sp_rank)),
        }
    except Exception:  # noqa: BLE001
        result = {"error": traceback.format_exc()}
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"deepspeed": result}, f)
        if dist.is_initialized():
            dist.destroy_process_group()


def test_deepspeed_sequence_parallel_group() -> None:
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    per_rank = _spawn(4, ["deepspeed"], _deepspeed_worker)
    for rank, results in enumerate(per_rank):
        r = results["deepspeed"]
        assert "error" not in r, f"rank {rank}:\n{r['error']}"
        assert r["group_is_sp"]
        assert r["out"] <= TOL64 and r["dk"] <= TOL64


def test_deepspeed_absent_falls_back() -> None:
    # DeepSpeed not imported in this process, or torch.distributed not initialised: the module's own group
    module = BlockSparseRingDistributedDilatedAttention(
        pattern="local_window", window_size=32, block_size=16,
        distributed_config=DistributedSparseConfig(enable_deepspeed_integration=True),
    )
    with pytest.warns(RuntimeWarning, match="DeepSpeed"):
        assert module.process_group() is None


# ------------------------------------------------------------------ single-process pieces
def test_single_process_equals_op() -> None:
    layout = pat.local_window(seq_len_q=150, block_size=16, window_size=48)
    q, k, v, dout = _tensors(2, 150, 4, 2, 8, torch.float64)
    ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
    out = ring_block_sparse_attention(ql, kl, vl, layout, causal=True)
    out.backward(dout)
    qf, kf, vf = (t.clone().requires_grad_() for t in (q, k, v))
    ref = ds.block_sparse_attention(qf, kf, vf, layout, causal=True)
    ref.backward(dout)
    assert _max_err(out, ref) <= TOL64
    for a, b in ((ql, qf), (kl, kf), (vl, vf)):
        assert _max_err(a.grad, b.grad) <= TOL64


def test_single_process_module_equals_op() -> None:
    module = BlockSparseRingDistributedDilatedAttention(segment_lengths=[64, 128], dilation_rates=[1, 2],
                                                        block_size=16)
    q, k, v, _ = _tensors(1, 130, 2, 2, 8, torch.float64)
    out = module(q, k, v, is_causal=True)
    ref = ds.block_sparse_attention(q, k, v, module.current_layout(130, 2), causal=True)
    assert _max_err(out, ref) <= TOL64
    with pytest.raises(ValueError, match="return_attention_weights"):
        module(q, k, v, return_attention_weights=True)


def test_merge_partials_matches_joint_softmax() -> None:
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(1, 2, 5, 12, generator=g, dtype=torch.float64)  # [B, H, Sq, Sk]
    values = torch.randn(1, 12, 2, 3, generator=g, dtype=torch.float64)  # [B, Sk, H, D]

    def part(sl: slice) -> tuple[torch.Tensor, torch.Tensor]:
        sc = scores[..., sl]
        lse = torch.logsumexp(sc, -1)
        out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(sc, -1), values[:, sl])
        return out, lse

    out_a, lse_a = part(slice(0, 5))
    out_b, lse_b = part(slice(5, 12))
    out, lse = merge_partials(out_a, lse_a, out_b, lse_b)
    ref_out, ref_lse = part(slice(0, 12))
    assert _max_err(out, ref_out) <= 1e-12 and _max_err(lse, ref_lse) <= 1e-12
    empty = torch.full_like(lse_a, -math.inf)
    out_e, lse_e = merge_partials(torch.zeros_like(out_a), empty, torch.zeros_like(out_a), empty)
    assert torch.all(out_e == 0) and torch.all(torch.isneginf(lse_e))


def test_shardings_cover_and_roundtrip() -> None:
    layout = pat.local_window(seq_len_q=200, block_size=16, window_size=48)
    x = torch.arange(200).view(1, 200, 1, 1)
    for world in (1, 2, 3, 4, 7, 20):
        for kind in ("contiguous", "zigzag", "balanced"):
            sh = make_sharding(kind, layout, world, causal=True)
            assert sum(sh.local_lengths()) == 200
            shards = [sh.split(x, r) for r in range(world)]
            assert torch.equal(sh.assemble(shards), x)
    # S / W a multiple of the block: every rank holds exactly S / W tokens
    assert contiguous_sharding(256, 4, 16).local_lengths() == [64] * 4
    zz = zigzag_sharding(256, 4, 16)
    assert zz.segments[0] == ((0, 32), (224, 256))
    with pytest.raises(ValueError, match="multiple of the block unit"):
        type(zz)(64, (((0, 8),), ((8, 64),)), 16)


def test_zigzag_and_balanced_even_out_causal_work() -> None:
    layout = pat.dense(seq_len_q=1024, block_size=16)
    work = ds.distributed.block_work(layout, causal=True)

    def per_rank(sh: Any) -> list[float]:
        owner, _ = sh.owner_of_blocks(16)
        return [float(work[owner == r].sum()) for r in range(4)]

    contiguous = per_rank(contiguous_sharding(1024, 4, 16))
    zigzag = per_rank(zigzag_sharding(1024, 4, 16))
    balanced = per_rank(balanced_sharding(layout, 4, causal=True))
    assert max(contiguous) / min(contiguous) > 5
    assert max(zigzag) / min(zigzag) < 1.1
    assert max(balanced) / min(balanced) < 1.2


def test_plan_fetches_only_named_blocks() -> None:
    # a local window of +-1 block over 8 ranks: a rank receives one block from each neighbour only
    layout = pat.block_neighbour(seq_len_q=8 * 64, block_size=16)
    sh = contiguous_sharding(8 * 64, 8, 16)
    plan = build_plan(layout, sh, 3)
    assert sorted(s for s in plan.frames if s != 3) == [2, 4]
    assert plan.recv_tokens(2) == 16 and plan.recv_tokens(4) == 16
    comm = plan.communication(batch=1, kv_heads=1, head_dim=64, element_size=2)
    assert comm["forward_received"] * 7 * 4 // 2 == comm["full_ring_forward_received"]


def test_redistribution_plan_inverse() -> None:
    a = contiguous_sharding(200, 3, 16)
    b = zigzag_sharding(200, 3, 16)
    x = torch.arange(200)
    for rank in range(3):
        plan = redistribution_plan(a, b, rank)
        # every token this rank needs under b comes from some peer's a-shard
        got = torch.empty(b.local_length(rank), dtype=torch.int64)
        for peer, where in plan.recv.items():
            their = redistribution_plan(a, b, peer).send[rank]
            got[where] = a.split(x.view(1, -1), peer)[0][their]
        assert torch.equal(got, b.split(x.view(1, -1), rank)[0])
        assert plan.inverse().inverse().send.keys() == plan.send.keys()


def test_config_validation() -> None:
    with pytest.raises(TypeError, match="valid options"):
        DistributedSparseConfig(shard="zigzag")
    with pytest.raises(ValueError, match="sharding"):
        DistributedSparseConfig(sharding="ring")
    with pytest.raises(ValueError, match="load_balance_interval"):
        DistributedSparseConfig(load_balance_interval=3)
    with pytest.raises(ValueError, match="pattern_update_interval"):
        DistributedSparseConfig(pattern_update_interval=-1)
    with pytest.raises(TypeError, match="keep_remote_kv"):
        DistributedSparseConfig(keep_remote_kv=1)
    cfg = DistributedSparseConfig(sharding="balanced", load_balance_interval=10)
    assert cfg.replace(load_balance_interval=0).load_balance_interval == 0
    assert ds.configs.DistributedSparseConfig is DistributedSparseConfig


def test_bad_inputs_name_the_argument() -> None:
    layout = pat.local_window(seq_len_q=64, block_size=16, window_size=32)
    q = torch.randn(1, 64, 2, 8)
    with pytest.raises(ValueError, match="q must be a 4-D"):
        ring_block_sparse_attention(q[0], q, q, layout)
    with pytest.raises(ValueError, match="q holds 48 tokens"):
        ring_block_sparse_attention(q[:, :48], q[:, :48], q[:, :48], layout)
    with pytest.raises(TypeError, match="layout must be a BlockSparseLayout"):
        ring_block_sparse_attention(q, q, q, "local")
    with pytest.raises(ValueError, match="key_padding_mask"):
        ring_block_sparse_attention(q, q, q, layout, key_padding_mask=torch.zeros(1, 64))
    with pytest.raises(ValueError, match="sharding must be"):
        ring_block_sparse_attention(q, q, q, layout, sharding="ring")
    with pytest.raises(ValueError, match="key_lengths must lie"):
        ring_block_sparse_attention(q, q, q, layout, key_lengths=torch.tensor([65]))
    with pytest.raises(TypeError, match="q must be float"):
        ring_block_sparse_attention(q.int(), q.int(), q.int(), layout)
    with pytest.raises(ValueError, match="Hkv dividing"):
        ring_block_sparse_attention(q, q[:, :, :1, :4], q[:, :, :1, :4], layout)


def test_communication_log_sums() -> None:
    log = CommunicationLog(forward_sent=1, backward_received=2, redistribution_sent=3)
    other = CommunicationLog(forward_sent=4)
    log.add(other)
    assert log.forward_sent == 5 and log.total == 10


def test_module_follows_sparse_config_changes() -> None:
    # a scheduler changes sparse_config.sparsity_ratio: the next call builds the new layout
    sparse = dilated_sparse.configs.SparsePatternConfig(pattern_type="dilated_sparse", sparsity_ratio=0.5,
                                                        block_size=16)
    module = BlockSparseRingDistributedDilatedAttention(sparse_config=sparse)
    q, k, v, _ = _tensors(1, 160, 2, 1, 8, torch.float64)
    module(q, k, v)
    first = module.current_layout(160, 2)
    sparse.sparsity_ratio = 0.2
    out = module(q, k, v)
    second = module.current_layout(160, 2)
    assert second.nnz < first.nnz
    assert _max_err(out, ds.block_sparse_attention(q, k, v, second)) <= TOL64


def test_factory_builds_the_distributed_module() -> None:
    modules = pytest.importorskip("dilated_sparse.modules")
    factory = getattr(modules, "create_block_sparse_attention", None)
    if factory is None:
        pytest.skip("dilated_sparse.modules has no create_block_sparse_attention yet")
    module = factory("distributed", distributed_config=DistributedSparseConfig(sharding="zigzag"),
                     pattern_type="local_window", local_window_size=64, block_size=16)
    assert isinstance(module, BlockSparseRingDistributedDilatedAttention)
    assert module.distributed_config.sharding == "zigzag"
    q, k, v, _ = _tensors(1, 100, 2, 2, 8, torch.float64)
    out = module(q, k, v, is_causal=True)
    ref = ds.block_sparse_attention(q, k, v, module.current_layout(100, 2), causal=True)
    assert _max_err(out, ref) <= TOL64


def test_module_block_size_must_agree_with_sparse_config() -> None:
    sparse = dilated_sparse.configs.SparsePatternConfig(pattern_type="local_window", block_size=64)
    with pytest.raises(ValueError, match=r"block_size=128.*sparse_config\.block_size=64"):
        BlockSparseRingDistributedDilatedAttention(sparse_config=sparse, block_size=128)
    module = BlockSparseRingDistributedDilatedAttention(sparse_config=sparse, block_size=64)
    assert module.block_size == (64, 64)
    q, k, v, _ = _tensors(1, 512, 2, 2, 16, torch.float64)
    module(q, k, v)
    assert module.current_layout(512, 2).block_size == module.block_size
    sparse.block_size = 32  # the module follows its config
    module(q, k, v)
    assert module.block_size == (32, 32) == module.current_layout(512, 2).block_size


def test_module_segments_must_be_used_by_the_pattern() -> None:
    segs = {"segment_lengths": [128, 256], "dilation_rates": [1, 2]}
    with pytest.raises(ValueError, match="segment_lengths/dilation_rates.*'local_window'"):
        BlockSparseRingDistributedDilatedAttention(**segs, pattern="local_window", window_size=128)
    with pytest.raises(ValueError, match="segment_lengths/dilation_rates.*'local_window'"):
        BlockSparseRingDistributedDilatedAttention(
            **segs, sparse_config=dilated_sparse.configs.SparsePatternConfig(pattern_type="local_window"))
    layout = pat.local_window(seq_len_q=512, block_size=64, window_size=128)
    with pytest.raises(ValueError, match="segment_lengths/dilation_rates.*fixed layout"):
        BlockSparseRingDistributedDilatedAttention(**segs, pattern=layout)
    with pytest.raises(ValueError, match="segment_lengths/dilation_rates.*callable"):
        BlockSparseRingDistributedDilatedAttention(**segs, pattern=pat.local_window, block_size=64)
    with pytest.raises(ValueError, match="same length"):
        BlockSparseRingDistributedDilatedAttention(segment_lengths=[128, 256], dilation_rates=[1])
    # a named pattern that takes them gets them (they were dropped before)
    q, k, v, _ = _tensors(1, 512, 2, 2, 16, torch.float64)
    with_segs = BlockSparseRingDistributedDilatedAttention(**segs, pattern="dilated_sparse", block_size=64)
    out = with_segs(q, k, v)
    expected = pat.dilated_sparse(seq_len_q=512, block_size=64, **segs)
    assert with_segs.current_layout(512, 2).equal(expected)
    assert _max_err(out, ds.block_sparse_attention(q, k, v, expected)) <= TOL64
    # a sparse_config whose pattern changes later is checked again before the next layout is built
    sparse = dilated_sparse.configs.SparsePatternConfig(pattern_type="dilated_sparse", block_size=64)
    module = BlockSparseRingDistributedDilatedAttention(**segs, sparse_config=sparse)
    module(q, k, v)
    sparse.pattern_type = "local_window"
    with pytest.raises(ValueError, match="segment_lengths/dilation_rates.*'local_window'"):
        module(q, k, v)


@pytest.mark.parametrize("scale", ["0.5", True, torch.tensor(0.5), float("nan"), float("inf")])
def test_scale_is_checked_like_the_op(scale: Any) -> None:
    layout = pat.local_window(seq_len_q=64, block_size=16, window_size=32)
    q = torch.randn(1, 64, 2, 8)
    with pytest.raises(TypeError, match="scale"):
        ds.block_sparse_attention(q, q, q, layout, scale=scale)
    with pytest.raises(TypeError, match="scale"):
        ring_block_sparse_attention(q, q, q, layout, scale=scale)
    with pytest.raises(TypeError, match="scale"):
        BlockSparseRingDistributedDilatedAttention(pattern="local_window", window_size=32, block_size=16, scale=scale)
    module = BlockSparseRingDistributedDilatedAttention(pattern=layout, scale=0.5)
    assert _max_err(module(q, q, q), ds.block_sparse_attention(q, q, q, layout, scale=0.5)) <= TOL32
