"""Plot the GPU benchmark figures recorded in ``benchmarks/results_gpu.json`` (see RESULTS.md).

    python benchmarks/plot_gpu.py [--json benchmarks/results_gpu.json] [-o benchmarks/gpu_bench.png]

One panel per shape: TFLOP/s (active blocks only) of ours and FlexAttention per pattern, forward and
forward+backward. Later runs in the file replace earlier rows of the same (shape, pattern, impl).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load_rows(path: Path) -> dict[tuple[str, str, str], dict]:
    """Rows keyed by (shape, pattern, impl), block-128 sparse rows only, later runs winning; a row
    marked ``outlier`` (a reading not reproduced, with the reason) leaves the earlier one."""
    rows: dict[tuple[str, str, str], dict] = {}
    for run in json.loads(path.read_text())["runs"]:
        for row in run["rows"]:
            if row["impl"] in ("ours", "flex") and row.get("block") == 128 and not row.get("outlier"):
                rows[(row["cfg"], row["pattern"], row["impl"])] = row
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=HERE / "results_gpu.json")
    parser.add_argument("-o", "--output", type=Path, default=HERE / "gpu_bench.png")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load_rows(args.json)
    shapes = sorted({cfg for cfg, _, _ in rows}, key=lambda c: (c.split()[1], int(c.split()[2][1:])))
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 3.9), squeeze=False)
    for ax, cfg in zip(axes[0], shapes):
        patterns = sorted({p for c, p, _ in rows if c == cfg and (c, p, "ours") in rows and (c, p, "flex") in rows})
        xs = range(len(patterns))
        for offset, (impl, key, colour) in enumerate(
            [("ours", "tf_fwd", "tab:blue"), ("flex", "tf_fwd", "tab:orange"),
             ("ours", "tf_fwdbwd", "tab:cyan"), ("flex", "tf_fwdbwd", "tab:red")]
        ):
            label = f"{impl} {'fwd' if key == 'tf_fwd' else 'fwd+bwd'}"
            ax.bar([x + 0.2 * offset - 0.3 for x in xs], [rows[(cfg, p, impl)][key] for p in patterns], 0.2,
                   label=label, color=colour)
        ax.set_xticks(list(xs), [p.replace(" ", "\n") for p in patterns], fontsize=7)
        ax.set_title(f"{cfg} bf16", fontsize=9)
        ax.set_ylabel("TFLOP/s (active blocks)")
    # One legend for all panels, below them: inside a panel it hid the tallest bars.
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.suptitle("dilated_sparse vs FlexAttention (same block mask), H200", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(args.output, dpi=80)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
