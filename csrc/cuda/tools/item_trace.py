"""Per-work-item clock64 trace of the sm_90 forward and dK/dV kernels: where an item's cycles go.

The stamps are not in the kernels on main; `item_trace.patch` beside this file adds them (each
consumer warpgroup's first thread and producer thread 0 write clock64 at fixed points of every work
item into a buffer whose address comes from DILATED_SPARSE_TRACE_PTR, for the kernel named by
DILATED_SPARSE_TRACE_KERNEL=fwd|dkv). In a scratch copy of the tree, on the GPU machine:

    git apply csrc/cuda/tools/item_trace.patch
    DILATED_SPARSE_CUDA_INSTANTIATIONS=hdim128_bf16 python3 setup.py build_ext --inplace
    python3 csrc/cuda/tools/item_trace.py --kernels fwd,dkv --patterns causal_local:0.05,local:0.025

For each pattern and kernel it runs three untraced forward+backward calls, then one traced call
(after a 256 MiB L2 flush, as gpu_bench.py times them), and prints the median (mean) cycles of each
phase over every CTA's items but its first and last: per consumer warpgroup (c0, c1) taking the
posted item, its start (the first-tile lookup), the wait for its primary tiles, for the first tile
and for the first turn, the body, the epilogue; for the producer (p) the claim, the decode, the
start and lookahead, the wait for the first slot, the copies, and the turnaround from one item's
last copy to the next item's first. With the forward's decode ahead (the default), item n's claim,
decode and post happen during item n - 1, so its "claim" reads negative and "start and lookahead"
spans the rest of item n - 1's copies. RESULTS.md (twenty-second session) has the numbers it gave.
Then the launch as a whole (whole_kernel: the patch's stamp_kernel writes the globaltimer and clock64
at each CTA's entry and exit): where each CTA's time goes, the first item (cold: every CTA loads its
first Q and tiles from DRAM at once) against the middle ones, and the wait for the last CTA
(RESULTS.md, twenty-seventh session).
--save writes the raw stamps (torch.save of a dict of [CTAs, items, roles, slots] tensors).
Checked at D128 (the default shape). At D64 (``--shape 1x32x16384x64``, twenty-fourth session) the
forward's first-tile and first-turn phases and "first tile landed" came out as large negative and
positive numbers that cancel: the first-landed stamp was reset only by a consumer's own lookup, which
the D64 forward skips (the producer posts it), so it kept the CTA's first item's value. The patch
resets it on the posted start too since the forty-eighth session (run at D64 in the forty-eighth and
forty-ninth sessions, at D128 in the forty-ninth).
The D32 / D64 forward's two-items kernel (kernels_sm90.cuh: kFwdTwoItems, two CTAs an SM) has one
consumer warpgroup: its phases are c0's; its producer's kernel-level stamps land in role 1.
Since the forty-ninth session's epilogue that kernel has no registers to spare for the stamps'
state. The patch keeps that kernel's consumer state out of registers (the lead thread re-read, the
tile count from the ring, the first landing stamped in the loop), yet ptxas still spills 284 / 344
bytes there (84 / 132 without; the producer's stamps are ~120 of them): the traced D64 launch at
S16k took 187 us at local 2.5% and 519 at 10%, against ~145 and ~472 untraced (fiftieth session;
212 and 640 before that change). So the D64 phases overstate the body (~9% a tile at 2.5%) and read
the rest within a few hundred cycles. The D128 default forward's spills grow less with the patch
(248 / 236 bytes to 296 / 296).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MAX_CTAS, ITEMS, ROLES, SLOTS = 512, 64, 3, 8  # as the patch's stamp(): kTraceItems, kTraceSlots (CTAs: two an SM)
KERNEL = ITEMS - 1  # the item slot of stamp_kernel's stamps (globaltimer and clock64 at entry and exit)
CONSUMER_PHASES = ("take (after the previous epilogue)", "start", "primary tiles wait", "first tile wait",
                   "first turn wait", "body", "epilogue")


def consumer_phases(cur: list, prev_end: int) -> list[int]:
    """A consumer warpgroup's stamps of one item (slots 0-6) as the cycles of CONSUMER_PHASES, the take
    counted from `prev_end` (the previous item's epilogue end, or the CTA's entry for its first)."""
    return [cur[0] - prev_end] + [cur[i + 1] - cur[i] for i in range(6)]


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def phases(t: list, parity: int | None = None) -> tuple[dict[str, list[float]], list[int]]:
    """Per-phase cycle counts from the stamps t[cta][item][role][slot] (0: not written); with `parity`,
    only each CTA's items n with n % 2 == parity (with claims of two items, DILATED_SPARSE_ITEM_CHUNK=2,
    a claim's first items are the even ones and the rest of its claims the odd ones, but for the
    launch's last items, claimed one at a time)."""
    rows: dict[str, list[float]] = {}

    def add(key: str, val: float) -> None:
        rows.setdefault(key, []).append(val)

    items_per_cta = []
    for T in (t[c] for c in range(MAX_CTAS) if t[c][0][0][0] != 0):
        n_items = sum(1 for n in range(KERNEL) if T[n][0][0] != 0 and T[n][0][6] != 0)
        items_per_cta.append(n_items)
        for n in range(1, n_items - 1):
            if parity is not None and n % 2 != parity:
                continue
            for r in (0, 1):
                cur, prv, nxt = T[n][r], T[n - 1][r], T[n + 1][r]
                if cur[7] == 0:
                    continue
                for name, val in zip(CONSUMER_PHASES, consumer_phases(cur, prv[6])):
                    add(f"c{r} {name}", val)
                add(f"c{r} item (take to take)", nxt[0] - cur[0])
                add(f"c{r} tiles", cur[7])
            P, Pp = T[n][2], T[n - 1][2]
            add("p claim (from the previous last copy)", P[0] - Pp[5])
            add("p decode", P[1] - P[0])
            add("p post", P[2] - P[1])
            add("p start and lookahead", P[3] - P[2])
            add("p first slot wait", P[4] - P[3])
            add("p copies", P[5] - P[4])
            add("p turnaround (last copy to the next first)", P[4] - Pp[5])
            add("c0 first tile landed - p first copy", T[n][0][3] - P[4])
    return rows, items_per_cta


def whole_kernel(t: list) -> dict[str, float]:
    """Where a traced launch's time goes, per CTA (means over CTAs, us unless named): its start after the
    first CTA's, entry to its first item, its first item, the middle items, its last item, the end of
    its item loop, and the wait for the last CTA; the launch's span (first entry to last exit, by the
    globaltimer) and SM clock (clock64 cycles per globaltimer ns); and, in cycles, consumer warpgroup
    0's phases of the first item (`first ...`) against their medians over the middle items (`mid ...`).
    The first item's Q and tiles come from DRAM for every CTA at once; the middle items' from L2."""
    ctas = [c for c in range(MAX_CTAS) if t[c][KERNEL][0][0] != 0]
    if not ctas:
        return {}
    t0 = min(t[c][KERNEL][0][0] for c in ctas)
    t_end = max(t[c][KERNEL][r][2] for c in ctas for r in range(ROLES))
    out: dict[str, list[float]] = {}

    def add(key: str, val: float) -> None:
        out.setdefault(key, []).append(val)

    for c in ctas:
        X = t[c]
        entry_ns, entry_clk, end_ns, end_clk = X[KERNEL][0][0], X[KERNEL][0][1], X[KERNEL][0][2], X[KERNEL][0][3]
        ghz = (end_clk - entry_clk) / max(1, end_ns - entry_ns)
        items = [n for n in range(KERNEL) if X[n][0][0] != 0 and X[n][0][6] != 0]
        if len(items) < 3 or end_ns == 0:
            continue
        n_last = items[-1]
        takes = [X[n][0][0] for n in items]
        add("clock GHz", ghz)
        add("start after the first CTA", (entry_ns - t0) / 1e3)
        add("entry to the first item", (takes[0] - entry_clk) / ghz / 1e3)
        add("first item", (takes[1] - takes[0]) / ghz / 1e3)
        add("middle items", (takes[-1] - takes[1]) / ghz / 1e3)
        add("last item", (X[n_last][0][6] - takes[-1]) / ghz / 1e3)
        add("to the loop's end", (end_clk - X[n_last][0][6]) / ghz / 1e3)
        add("wait for the last CTA", (t_end - end_ns) / 1e3)
        for n in items[:-1]:
            prev_end = entry_clk if n == 0 else X[n - 1][0][6]
            for name, val in zip(CONSUMER_PHASES, consumer_phases(X[n][0], prev_end)):
                add(f"{'first' if n == 0 else 'mid'} {name}", val)
    res = {k: (median(v) if k.startswith("mid ") else sum(v) / len(v)) for k, v in out.items()}
    res["span"] = (t_end - t0) / 1e3
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1x16x16384x128", help="BxHxSxD")
    ap.add_argument("--patterns", default="causal_local:0.05,local:0.025,local:0.10")
    ap.add_argument("--kernels", default="fwd,dkv")
    ap.add_argument("--save", default="", help="write the raw stamps here (torch.save)")
    ap.add_argument("--by-parity", action="store_true",
                    help="also the phases of each CTA's even and odd items apart (claims of two items)")
    args = ap.parse_args()
    from bench_point import point_calls
    from gpu_bench import l2_flush_buffer

    buf = torch.zeros(MAX_CTAS * ITEMS * ROLES * SLOTS, dtype=torch.int64, device="cuda")
    flush = l2_flush_buffer()
    saved = {}
    for spec in args.patterns.split(","):
        kind, dens = spec.split(":")
        _, call = point_calls(f"{args.shape}:{spec}")  # forward + backward

        for kern in args.kernels.split(","):
            for _ in range(3):
                call()
            torch.cuda.synchronize()
            buf.zero_()
            flush.zero_()
            os.environ["DILATED_SPARSE_TRACE_PTR"] = str(buf.data_ptr())
            os.environ["DILATED_SPARSE_TRACE_KERNEL"] = kern
            call()
            torch.cuda.synchronize()
            del os.environ["DILATED_SPARSE_TRACE_PTR"]
            stamps = buf.view(MAX_CTAS, ITEMS, ROLES, SLOTS).cpu()
            saved[f"{kind}_{dens}_{kern}"] = stamps
            table = stamps.tolist()  # [cta][item][role][slot], read by every summary below
            rows, items = phases(table)
            print(f"\n== {args.shape} {kind} {dens} {kern}: {len(items)} CTAs, items a CTA {median(items)}; "
                  "cycles, median (mean)")
            for key, vals in rows.items():
                print(f"  {key:44s} {median(vals):8.0f} ({sum(vals) / len(vals):8.0f})")
            if args.by_parity:
                even, odd = phases(table, 0)[0], phases(table, 1)[0]
                print("  even items / odd items, median")
                for key in rows:
                    print(f"    {key:42s} {median(even.get(key, [])):8.0f} / {median(odd.get(key, [])):8.0f}")
            whole = whole_kernel(table)
            if whole:
                print(f"  launch span {whole['span']:.1f} us at {whole['clock GHz']:.3f} GHz; per CTA, us (mean):")
                for key in ("start after the first CTA", "entry to the first item", "first item", "middle items",
                            "last item", "to the loop's end", "wait for the last CTA"):
                    print(f"    {key:42s} {whole[key]:8.2f}")
                print("  consumer warpgroup 0, cycles: the first item (mean) / the middle items (median)")
                for name in CONSUMER_PHASES:
                    print(f"    {name:42s} {whole['first ' + name]:8.0f} / {whole['mid ' + name]:8.0f}")
    if args.save:
        torch.save(saved, args.save)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
