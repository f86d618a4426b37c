"""A PyTorch Lightning module around a block-sparse language model (skips if Lightning is absent).

The model and the synthetic data are those of ``train_long_sequence.py`` (same folder): a small
causal LM whose attention is :func:`dilated_sparse.block_sparse_attention` over a layout built once
from a named pattern. Lightning handles the loop, devices and precision.

Run::

    pip install lightning            # or pytorch-lightning
    python examples/lightning_module.py --seq-len 4096 --max-steps 50
    python examples/lightning_module.py --accelerator gpu --precision bf16-mixed --seq-len 32768

Without Lightning installed the script prints a note and exits with status 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_long_sequence import SparseLM, synthetic_batch

from dilated_sparse.patterns import make_layout


def import_lightning():
    """``lightning.pytorch`` or ``pytorch_lightning``; None when neither is installed."""
    try:
        import lightning.pytorch as pl
    except ImportError:
        try:
            import pytorch_lightning as pl
        except ImportError:
            return None
    return pl


def build(pl, args: argparse.Namespace):
    """The LightningModule class and a DataLoader of synthetic batches (defined once ``pl`` is known)."""

    class SparseLMModule(pl.LightningModule):
        """Causal LM over block-sparse attention; the layout is a buffer-free attribute moved with the module."""

        def __init__(self, vocab: int, dim: int, depth: int, heads: int, kv_heads: int, seq_len: int,
                     pattern: str, pattern_options: dict, block_size: int, lr: float) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.model = SparseLM(vocab, dim, depth, heads, kv_heads)
            self.layout = make_layout(pattern, seq_len_q=seq_len, block_size=block_size, causal=True,
                                      **pattern_options)
            self.losses: list[float] = []

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.model(tokens, self.layout.to(tokens.device))  # cached per device by the layout

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            logits = self(batch[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            self.log("loss", loss, prog_bar=True)
            self.losses.append(float(loss.detach()))
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)

    class SyntheticData(torch.utils.data.IterableDataset):
        def __iter__(self):
            generator = torch.Generator().manual_seed(args.seed)
            while True:
                yield synthetic_batch(1, args.seq_len + 1, args.vocab, args.period, 0.1, generator)[0]

    module = SparseLMModule(args.vocab, args.dim, args.depth, args.heads, args.kv_heads, args.seq_len,
                            args.pattern, json.loads(args.pattern_options), args.block_size, args.lr)
    loader = torch.utils.data.DataLoader(SyntheticData(), batch_size=args.batch)
    return module, loader


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--period", type=int, default=48)
    p.add_argument("--pattern", default="local_window")
    p.add_argument("--pattern-options", default='{"window_size": 128}')
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--precision", default=None,
                   help="default: bf16-mixed where the run will use CUDA (the CUDA kernels take float16 / "
                        "bfloat16), else 32-true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.precision is None:
        cuda = args.accelerator in ("cuda", "gpu") or (args.accelerator == "auto" and torch.cuda.is_available())
        args.precision = "bf16-mixed" if cuda else "32-true"
    return args


def main(argv: list[str] | None = None) -> dict | None:
    """Train with Lightning; returns ``{"losses": [...]}``, or None when Lightning is missing."""
    args = parse_args(argv)
    pl = import_lightning()
    if pl is None:
        print("lightning is not installed (pip install lightning); skipping the Lightning example")
        return None
    pl.seed_everything(args.seed, verbose=False)
    module, loader = build(pl, args)
    trainer = pl.Trainer(max_steps=args.max_steps, accelerator=args.accelerator, devices=1,
                         precision=args.precision, logger=False, enable_checkpointing=False,
                         enable_progress_bar=not args.no_progress, enable_model_summary=False)
    trainer.fit(module, loader)
    losses = module.losses
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")
    return {"losses": losses}


if __name__ == "__main__":
    main()
