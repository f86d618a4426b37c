"""Regenerate the pattern gallery (``docs/gallery/*.png``) with ``dilated-sparse show``.

Run from the repository root: ``python docs/gallery/generate.py`` (needs matplotlib). Every picture
is made by the command line, so each entry below is also an example of a ``show`` command:
``dilated-sparse show <pattern> --seq-len 2048 --block-size 64 <options> -o <file>``.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from dilated_sparse.cli import main

SEQ_LEN, BLOCK = "2048", "64"

#: (file stem, pattern, extra options, caption)
GALLERY: list[tuple[str, str, list[str], str]] = [
    ("local_window", "local_window", ["--window-size", "256"], "sliding window of 256 tokens (128 each side)"),
    ("local_window_causal", "local_window", ["--window-size", "256", "--causal"], "causal sliding window"),
    ("dilated_sparse", "dilated_sparse", ["--segment-lengths", "256,512,1024,2048", "--dilation-rates", "1,2,4,8"],
     "LongNet dilated segments (256/512/1024/2048 tokens, dilation 1/2/4/8)"),
    ("global_local", "global_local", ["--global-tokens", "128", "--window-size", "192"],
     "128 global tokens + local window"),
    ("longformer", "longformer", ["--window-size", "256", "--global-indices", "0,1024"],
     "Longformer: window + global tokens 0 and 1024"),
    ("bigbird", "bigbird", ["--heads", "4", "--different-layout-per-head", "--num-random-blocks", "2"],
     "BigBird: global + window + random blocks, one layout per head"),
    ("fixed", "fixed", ["--num-local-blocks", "4", "--num-global-blocks", "1"], "DeepSpeed fixed"),
    ("variable", "variable", ["--local-window-blocks", "2,4,8", "--global-block-indices", "0,16",
                              "--num-random-blocks", "1"], "DeepSpeed variable"),
    ("strided", "strided", ["--local-attn-ctx", "512", "--causal"], "Sparse Transformer strided (causal)"),
    ("hierarchical", "hierarchical", [], "hierarchical multi-level windows"),
    ("butterfly", "butterfly", [], "flat block butterfly"),
    ("random", "random", ["--density", "0.1"], "random blocks at 10% density"),
]


def command(pattern: str, options: list[str], stem: str) -> list[str]:
    """The ``show`` arguments that draw one gallery picture."""
    return ["show", pattern, "--seq-len", SEQ_LEN, "--block-size", BLOCK, *options, "-o", f"docs/gallery/{stem}.png"]


def markdown() -> str:
    """``docs/gallery/README.md``: a table of the pictures with the command that drew each."""
    lines = [
        "# Pattern gallery",
        "",
        f"Block layouts at {SEQ_LEN} tokens with {BLOCK}-token blocks (query blocks down, key blocks across; a dark",
        "cell is a computed block). Each picture was drawn by the command under it; regenerate them all with",
        "`python docs/gallery/generate.py`.",
        "",
        "| | |",
        "|---|---|",
    ]
    cells = []
    for stem, pattern, options, caption in GALLERY:
        cmd = " ".join(["dilated-sparse", *command(pattern, options, stem)[:-2]])
        cells.append(f"![{stem}]({stem}.png)<br>**{caption}**<br>`{cmd}`")
    for i in range(0, len(cells), 2):
        pair = cells[i:i + 2] + [""] * (2 - len(cells[i:i + 2]))
        lines.append(f"| {pair[0]} | {pair[1]} |")
    return "\n".join(lines) + "\n"


def main_gallery() -> int:
    """Write every picture and the gallery README; returns the number of failures."""
    failures = 0
    for stem, pattern, options, _caption in GALLERY:
        argv = command(pattern, options, stem)
        argv[-1] = str(HERE / f"{stem}.png")
        print("dilated-sparse " + " ".join(argv), flush=True)
        failures += main(argv) != 0
    (HERE / "README.md").write_text(markdown())
    return failures


if __name__ == "__main__":
    raise SystemExit(main_gallery())
