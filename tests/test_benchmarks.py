"""The GPU benchmark's helpers (benchmarks/gpu_bench.py): the clock monitor's parsing, per-timing
summaries, the GPU identity and Flex's block mask of a layout."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import gpu_bench


def test_monitor_parses_samples_and_skips_other_lines():
    parse = gpu_bench.GpuMonitor.parse
    assert parse("1650, 690.50, 0x0000000000000004\n", 2.0) == (2.0, 1650.0, 690.5, "0x0000000000000004")
    assert parse("[N/A], [N/A], 0x0", 2.0) is None
    assert parse("No devices were found", 2.0) is None


def test_monitor_window_summarises_only_its_samples():
    m = gpu_bench.GpuMonitor(sample=False)  # no nvidia-smi process
    m.samples = [(1.0, 1650.0, 690.0, "0x4"), (1.05, 1440.0, 700.0, "0x4"), (1.1, 1665.0, 695.0, "0x0"),
                 (2.0, 1980.0, 100.0, "0x0")]
    w = m.window(0.9, 1.2)
    assert w == {"sm_mhz": 1650.0, "sm_mhz_min": 1440.0, "power_w": 695.0, "throttle": ["0x0", "0x4"], "samples": 3}
    assert m.window(3.0, 4.0) == {}
    assert gpu_bench._clock_cell(w) == "1650 (1440)"
    assert gpu_bench._clock_cell({}) == "-"


def test_timing_fields_count_fwd_bwd_as_three_and_a_half_forwards():
    row = gpu_bench.timing_fields(4e12, 10.0, 20.0, {"gpu_fwd": {"sm_mhz": 1980.0}})
    assert row == {"fwd_ms": 10.0, "fwdbwd_ms": 20.0, "tf_fwd": 400.0, "tf_fwdbwd": 700.0,
                   "gpu_fwd": {"sm_mhz": 1980.0}}


def test_identity_parses_one_gpu_line_and_skips_others():
    line = "GPU-b3b6c68a-2663, 00000000:19:00.0, 580.65.06, 96.00.A5.00.01, 1980, 3201, 700.00, Enabled, 36\n"
    ident = gpu_bench.parse_identity(line)
    assert ident["uuid"] == "GPU-b3b6c68a-2663" and ident["clocks.max.mem"] == "3201"
    assert ident["power.limit"] == "700.00" and ident["temperature.gpu"] == "36"
    assert list(ident) == list(gpu_bench.IDENTITY_FIELDS)
    assert gpu_bench.parse_identity("No devices were found") == {}
    assert gpu_bench.parse_identity("") == {}


def test_flex_block_mask_holds_the_layouts_blocks():
    pytest.importorskip("torch.nn.attention.flex_attention")
    layout = gpu_bench.pattern(8, "dilated", 0.4)
    block_mask = gpu_bench.flex_block_mask(layout, 8 * 128, 128, "cpu")
    assert torch.equal(block_mask.to_dense()[0, 0].bool(), layout)


def test_paired_ratios_compare_throughput_round_by_round():
    """Each call's throughput against the first call's in the same round, then the median: a round
    that slows every call (a clock dip) leaves the ratios alone, and the work of each call counts."""
    times = [[100.0, 200.0, 100.0], [50.0, 100.0, 60.0], [110.0, 220.0, 100.0]]
    work = [1.0, 0.4, 1.0]
    # Call 1: 0.4 / 50 against 1 / 100 is 0.8 in rounds 1 and 2, 0.667 in round 3.
    # Call 2: 1 / 1.1 in rounds 1 and 2, 1.0 in round 3.
    assert gpu_bench.paired_ratios(times, work) == pytest.approx([0.8, 1 / 1.1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_time_rounds_alternates_the_order_and_times_every_call():
    """One call of each a round, the order reversed every other round, after five warm-up calls of
    each; the L2 flush (or, without it, the sleep) precedes every timed call."""
    seen: list[int] = []
    prepared: list[int] = []

    def call(i: int):
        return lambda: seen.append(i) or torch.cuda._sleep(1000)

    times = gpu_bench.time_rounds([call(0), call(1), call(2)], 3, None, prepared.append)
    assert seen == [0] * 5 + [1] * 5 + [2] * 5 + [0, 1, 2, 2, 1, 0, 0, 1, 2]
    assert prepared == [0, 1, 2, 0, 1, 2, 2, 1, 0, 0, 1, 2]
    assert len(times) == 3 and all(len(t) == 3 and min(t) > 0 for t in times)
    flush = gpu_bench.l2_flush_buffer()
    assert flush.numel() == 256 << 20
    assert len(gpu_bench.time_rounds([call(0)], 2, flush)[0]) == 2
