"""Generate csrc/cuda/instantiations/*.cu: one file per (op, head dim, dtype), each registering the
tile variants listed here (variant 0 is the default; attention.cu picks another for small blocks or
when DILATED_SPARSE_{FWD,DQ,DKV}_VARIANT is set). Run from the repository root:

    python csrc/cuda/tools/gen_instantiations.py [--out DIR]

(tests/test_build.py checks that the committed files match this generator.)
"""

import argparse
from pathlib import Path

# Variant 0 is the default; a 4th entry True marks a variant the host may pick automatically when
# the layout's primary block is smaller than the default tile (attention.cu: pick()).
# Defaults from csrc/cuda/tools/tune_variants.py on an H200 (B1 S16384 local 10%, bf16; see
# benchmarks/RESULTS.md): fwd D128 (128, 64, 2) 245 TF vs (128, 64, 1) ~220 TF; at block 64 the 64-row
# tile wins for D128, the 128-row one for D64; dK/dV with 64 keys per CTA wins at D128.
# fwd / dq: (BM query rows per CTA, BN keys per step, MT m16 tiles per warp)
FWD = {
    32: [(128, 128, 1), (128, 128, 2), (64, 128, 1, False)],
    64: [(128, 64, 2), (128, 128, 1), (64, 128, 1, False)],
    96: [(128, 64, 1), (128, 64, 2), (64, 64, 1, True)],
    128: [(128, 64, 2), (128, 64, 1), (64, 64, 1, True), (128, 32, 2)],
    256: [(64, 32, 1), (64, 64, 1)],
}
DQ = {
    32: [(64, 64, 1), (128, 64, 2)],
    64: [(128, 32, 2), (64, 64, 1, True)],
    96: [(64, 64, 1), (128, 32, 2)],
    128: [(128, 32, 2), (64, 64, 1), (64, 32, 1, True)],
    256: [(64, 32, 1)],
}
# dkv: (BN keys per CTA, BM queries per step, DO output columns per CTA)
DKV = {
    32: [(128, 64, 32), (64, 64, 32, True)],
    64: [(128, 64, 64), (64, 64, 64, True)],
    96: [(64, 32, 96), (128, 32, 96)],
    128: [(64, 32, 128), (128, 32, 128), (128, 64, 64), (64, 64, 64)],
    256: [(64, 32, 128), (64, 32, 64)],
}
# Hopper (sm_90a, wgmma) variants, registered as variants 4, 5, ... of the same (op, dtype, head dim)
# and preferred on compute capability 9.0 (attention.cu: pick()). Own files (*_sm90_*), compiled for
# every arch but with real bodies only for sm_90a (kernels_sm90.cuh).
# fwd / dq: (WG warpgroups of 64 query rows, BN keys per step, schedule: kernels_sm90.cuh Sm90Sched);
# dkv: (WG warpgroups of 64 keys, BM queries per step, schedule). A last "small" marks a small-block
# variant, "short" one the host prefers when the rows are short, "wide" one it prefers (rows not short)
# when the secondary block is a multiple of the variant's step (attention.cu: pick()).
FWD_SM90 = {
    32: [("1", "128", "kSchedPingPong2 | kFwdTwoItems | kHalfScoreK | kNarrowOut"),
         ("2", "128", "kSchedPingPongOverlap | kFwdQRegs | kHalfScoreK | kNarrowOut")],
    64: [("1", "128", "kSchedPingPong2 | kFwdTwoItems"), ("2", "128", "kSchedPingPongOverlap | kFwdQRegs"),
         ("1", "64", "kSchedOverlap", "small"), ("2", "128", "kSchedLockstep"), ("2", "128", "kSchedPingPong2"),
         ("2", "128", "kSchedPingPong")],
    128: [("2", "128", "kSchedPingPong | kFwdLazyRescale | kFwdQRegs"), ("2", "128", "kSchedLockstep"),
          ("1", "64", "kSchedLockstep", "small"), ("2", "128", "kSchedPingPong2", "short"), ("2", "128", "kSchedPingPongOverlap"),
          ("2", "128", "kSchedPingPongSplit")],
    256: [("2", "64", "kSchedPingPong | kFwdLazyRescale")],
    96: [("2", "128", "kSchedPingPong | kFwdLazyRescale | kFwdQRegs | kThreeQuarterScoreK | kNarrowOut"),
         ("1", "64", "kSchedLockstep | kThreeQuarterScoreK | kNarrowOut", "small"), ("2", "128", "kSchedPingPong2 | kThreeQuarterScoreK | kNarrowOut", "short")],
}
DQ_SM90 = {
    32: [("2", "128", "kSchedPingPong2 | kHalfScoreK | kNarrowOut"), ("2", "128", "kSchedPingPong | kHalfScoreK | kNarrowOut")],
    64: [("2", "128", "kSchedPingPong"), ("2", "128", "kSchedLockstep"), ("1", "64", "kSchedOverlap", "small"),
         ("2", "128", "kSchedPingPong2", "short"), ("2", "64", "kSchedPingPongOverlap")],
    128: [("2", "64", "kSchedPingPong"), ("2", "128", "kSchedPingPong", "wide"), ("2", "64", "kSchedOverlap"),
          ("2", "64", "kSchedPingPong2", "short"), ("2", "64", "kSchedPingPongOverlap")],
    256: [("2", "32", "kSchedPingPong")],
    96: [("2", "64", "kSchedPingPong | kThreeQuarterScoreK | kNarrowOut"), ("2", "128", "kSchedPingPong | kThreeQuarterScoreK | kNarrowOut", "wide"),
         ("2", "64", "kSchedPingPong2 | kThreeQuarterScoreK | kNarrowOut", "short")],
}
# D32 (kHalfScoreK; the generator writes these with the kernel's tile width, 64): the D64 defaults'
# schedules, the score products over the first 32 columns. H200, thirty-second session: 3-8% faster
# than D32 in the D64 kernels (which already beat the mma.sync D32 kernels 1.6-1.8x); 0.92-1.00x Flex.
# kNarrowOut (thirty-fourth session): the products that make outputs over the 32 columns too, the same
# results bit for bit; forward 0.955-0.961 and backward 0.935-0.963 of the time at S16k H32 local
# 10% / causal_local / local 2.5% (forced variants, interleaved rounds), fwd+bwd 1.00-1.06x Flex.
# D32 dQ and dK/dV default to kSchedPingPong2 (thirty-fifth session, H200, S16k H32 bf16, the same
# gradients bit for bit; the old defaults are variant 5): the backward 1.2-2.7% faster at local 10%,
# 4.5-4.8% at causal_local and 5.9-6.0% at local 2.5% (two calls, five interleaved rounds each). The
# other forward schedules were within +-1.3% of the default (64 keys a step 37% slower), as was dK/dV
# ping-pong-2 with the early dV; dQ with 64 keys a step 10-16% slower.
# D64 dQ and dK/dV: kSchedPingPong2 is "short" (rows of at most kShortRowTokens): the backward 1.5-3.2%
# faster at S16k local 2.5% (H32 / H16) and 5.4% at 1.25%, the same gradients bit for bit; at longer
# rows it was within +-1% (local 10%, dilated, S64k local 2.5%), so the default stays there. The same
# code read 2.3% apart at causal_local in that call: these gains are near the noise, the direction
# held in both calls.
# D96 (kThreeQuarterScoreK | kNarrowOut; written with the tile width, 128): the D128 defaults' schedules
# (and its small, short, wide and dS-scratch variants), every product over 96 columns; before, D96 ran
# the D128 kernels with zero-filled columns. Thirty-fourth session, H200, S16k H16 bf16: the same
# results bit for bit, forward 0.939-0.973 and fwd+bwd 0.929-0.965 of the time.
# D256 (thirty-second session, H200, S16k H16 bf16, against Flex in the same process; RESULTS.md):
# the forward with 64 keys a step in two ring stages (128 Q rows and three 64-key stages do not fit)
# 1.96-2.48x Flex at local 10% / causal_local / local 2.5% (the mma.sync forward 0.91-0.99x); the dQ
# with 32 keys a step in three stages took the fwd+bwd from 0.78-0.82x to 1.00-1.01x Flex, and the
# dK/dV in column halves (kDkvSplitCols: 64 keys x 256 columns of dK and dV would take 256
# registers a thread) to 1.91-2.12x.
# D64 and D32 fwd default (forty-eighth session): kFwdTwoItems, one consumer warpgroup walking a
# 128-row item in two 64-row halves, two CTAs an SM (kernels_sm90.cuh). H200, ab_env.py against the
# ping-pong-overlap default it replaced (now variant 5; same process, call by call, 60-150 rounds,
# faster in 98-100% of them; "x% faster": 1 - new / old): D64 H32 S16k 9-14% faster at local 10% /
# dilated / causal_local / local 2.5% / global_local, S64k 9-11%, block 64 4% (and 10% faster than
# the small tile at 448 tokens a row, which sm_90 no longer takes: attention.cu
# small_tile_max_tokens), every band width from 1 to 25 blocks a row 5.5-12%; D32 15-21% faster at
# local 10% / local 2.5% / causal_local.
# D128 fwd default: ping-pong with the lazy rescale (kernels_sm90.cuh: kFwdLazyRescale; D64's
# overlapped default gained nothing from it). Both fwd defaults keep Q in registers (kFwdQRegs; H200,
# seventeenth session, forced variants in one process, 3-5 interleaved rounds, out and lse equal bit
# for bit): D128 1-2.6% faster at S16k 10% / dilated / causal_local / global_local and at S64k,
# equal at 1-3 blocks a row; D64 1-3.4% faster at every point tried.
# D128 dQ and dK/dV: no small variant; the 128-row ping-pong tiles beat the 64-row ones at block 64 too.
# D128 dQ variant 5 (128 keys, two stages; "wide"): 2-3% faster at block 128 on rows longer than
# ~1000 tokens, 3% slower on ~850, 16% slower at block 64 (attention.cu: kWideRowTokens).
# kSchedPingPongOverlap (ping-pong plus FA3's intra-warpgroup overlap; H200, S16k, 4 patterns): D64
# fwd 1-5% faster than kSchedPingPong (hence its default), D128 fwd within +-2%; dQ 7-11% slower
# (64 keys a step; 128 spills at D64), kept as variant 8 for comparison.
# kSchedPingPong2 (two buffers of primary tiles; two ring stages at D128 fwd, three at D128 dK/dV):
# with cp.async producers D128 fwd 17% faster than kSchedPingPong with ~3 key blocks a row, 3-4%
# with ~7, equal at ~10, 13% slower with ~13 (with TMA producers its "short" range shrank to 2.5
# blocks, below); D128 dK/dV 2-6% faster than kSchedPingPong (variant 7) on the H200. D128 dQ
# (three stages of 64 keys either way): the backward 2-4% faster with ~3 key blocks a row, equal
# with ~7 (hence "short" too).
# kSchedPingPongSplit (two Q buffers, three K and two V slots; H200, three alternating timings
# each, cp.async producers): S16k 3-4% faster than kSchedPingPong with ~12 key blocks a row, 6%
# faster than kSchedPingPong2 with ~7; S64k within +-2% of kSchedPingPong; ~2% slower than
# kSchedPingPong2 with ~3. Since the producers copy with TMA (ninth session; H200, three
# interleaved rounds), kSchedPingPong (one Q buffer, three ring stages) is the D128 fwd default:
# at S16k 1-4% faster than kSchedPingPongSplit at 5-10% density and 7% at 2.5% (3 blocks a row),
# where kSchedPingPong2 is now 1% slower than the Split; S64k within +-2.5% of the Split; block 64
# 0.3-2.6% faster. kSchedPingPong2 keeps "short" for rows of at most 2.5 blocks (attention.cu:
# kShortRowTokensFwd): 8-9% faster than kSchedPingPong with 1 and 2 blocks a row, 10% slower with 3,
# 7-17% slower from there up (seventeenth session, against the default with Q in registers: 11% and
# 7% faster with 1 and 2 blocks, 8% slower with 3, 11-15% slower at 5-10% density).
# kDkvEarlyDv (dV issued as soon as P^T is in registers, running while dS^T is computed; H200,
# nineteenth session, the same gradients bit for bit): D128 backward 1-4% faster at S16k local 10%,
# dilated and causal_local, 1-2% at local 2.5%, two builds in interleaved rounds; D64 (forced
# variants, against variant 8) 1-2.5% faster at 10% density and causal_local, equal within noise at
# 2.5%, although the fragments held across it spill a little at 128 queries a step.
DKV_SM90 = {
    32: [("2", "128", "kSchedPingPong2 | kHalfScoreK | kNarrowOut"),
         ("2", "128", "kSchedPingPong | kDkvEarlyDv | kHalfScoreK | kNarrowOut"),
         ("2", "128", "kSchedPingPong2 | kDkvEarlyDv | kHalfScoreK | kNarrowOut")],
    64: [("2", "128", "kSchedPingPong | kDkvEarlyDv"), ("2", "128", "kSchedLockstep"),
         ("1", "64", "kSchedOverlap", "small"), ("2", "128", "kSchedPingPong2", "short"), ("2", "128", "kSchedPingPong")],
    128: [("2", "64", "kSchedPingPong2 | kDkvEarlyDv"), ("2", "64", "kSchedLockstep"), ("2", "64", "kSchedOverlap"),
          ("2", "64", "kSchedPingPong"), ("2", "64", "kSchedPingPong2 | kSchedWriteDs | kDkvEarlyDv", "ds")],
    256: [("2", "32", "kSchedPingPong | kDkvEarlyDv | kDkvSplitCols")],
    96: [("2", "64", "kSchedPingPong2 | kDkvEarlyDv | kThreeQuarterScoreK | kNarrowOut"),
         ("2", "64", "kSchedPingPong2 | kSchedWriteDs | kDkvEarlyDv | kThreeQuarterScoreK | kNarrowOut", "ds")],
}
SM90_FIRST_VARIANT = 4
SM90_FLAGS = {"small": 1, "short": 2, "wide": 4, "ds": 8}  # KernelEntry flags (params.h)
# The dS-scratch backward (attention.cu: ds_mode): dQ = dS K after the dK/dV variant marked "ds"
# above wrote dS; registered as the dQ variant after the table's (never picked, taken by ds_mode).
# Head dim served -> the kernel's tile width (D96: the D128 kernel, K's columns past 96 zero).
DQ_DS_SM90 = {128: 128, 96: 128}
DTYPES = [("fp16", "__half", 0), ("bf16", "__nv_bfloat16", 1)]
MACRO = {"fwd": "DS_REGISTER_FWD", "dq": "DS_REGISTER_DQ", "dkv": "DS_REGISTER_DKV"}
HEADER = (
    "// (op, dtype, head dim) per file so that builds run in parallel and a reduced set can be\n"
    "// selected (DILATED_SPARSE_CUDA_INSTANTIATIONS)."
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "instantiations")
    out = ap.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    for op, table in (("fwd", FWD), ("dq", DQ), ("dkv", DKV)):
        for d, variants in table.items():
            for name, ctype, di in DTYPES:
                lines = [
                    f"// Instantiation: {op}, head dim {d}, {name}. Generated by tools/gen_instantiations.py; one",
                    "// (op, dtype, head dim) per file so that builds run in parallel and a reduced set can be",
                    "// selected (DILATED_SPARSE_CUDA_INSTANTIATIONS).",
                    '#include "../kernels.cuh"',
                    "",
                    "namespace dilated_sparse::cuda {",
                ]
                for v, var in enumerate(variants):
                    a, b, c = var[:3]
                    auto = int(len(var) > 3 and var[3])
                    lines.append(f"{MACRO[op]}({ctype}, {di}, {d}, {v}, {a}, {b}, {c}, {auto})")
                lines.append("}  // namespace dilated_sparse::cuda")
                (out / f"{op}_hdim{d}_{name}.cu").write_text("\n".join(lines) + "\n")
    for op, table in (("fwd", FWD_SM90), ("dq", DQ_SM90), ("dkv", DKV_SM90)):
        for d, variants in table.items():
            for name, ctype, di in DTYPES:
                lines = [
                    f"// Instantiation: {op} (sm_90a wgmma), head dim {d}, {name}. Generated by tools/gen_instantiations.py; one",
                    HEADER,
                    '#include "../kernels_sm90.cuh"',
                    "",
                    "namespace dilated_sparse::cuda {",
                ]
                for v, var in enumerate(variants):
                    args = [str(x) for x in var[:3]]
                    auto = SM90_FLAGS[var[3]] if len(var) > 3 else 0
                    # the kernel's tile width (kernels_sm90.cuh: score_cols)
                    kd = 2 * d if "kHalfScoreK" in var[2] else 4 * d // 3 if "kThreeQuarterScoreK" in var[2] else d
                    lines.append(f"{MACRO[op]}_SM90({ctype}, {di}, {kd}, {SM90_FIRST_VARIANT + v}, "
                                 f"{', '.join(args)}, {auto})")
                if op == "dq" and d in DQ_DS_SM90:
                    v = SM90_FIRST_VARIANT + len(variants)
                    if DQ_DS_SM90[d] == d:
                        lines.append(f"DS_REGISTER_DQ_DS_SM90({ctype}, {di}, {d}, {v})")
                    else:
                        lines.append(f"DS_REGISTER_DQ_DS_SM90_AS({ctype}, {di}, {DQ_DS_SM90[d]}, {d}, {v})")
                lines.append("}  // namespace dilated_sparse::cuda")
                (out / f"{op}_sm90_hdim{d}_{name}.cu").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
