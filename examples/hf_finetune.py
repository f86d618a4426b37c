"""Fine-tune a Hugging Face transformers model with block-sparse attention on generated data.

By default a tiny Llama-style decoder (grouped-query attention) is built from a config, so nothing
is downloaded; ``--model NAME_OR_PATH`` loads a real checkpoint instead (``from_pretrained``).
The model's attention is swapped for ``dilated_sparse`` with the chosen pattern by
:func:`dilated_sparse.integrations.transformers.apply_dilated_sparse`, then it is trained for a
few steps on generated data (a Markov chain whose tokens mostly repeat the one ``--period``
tokens back), printing the loss (``tqdm`` bar).

Run::

    python examples/hf_finetune.py                                  # tiny model, local window
    python examples/hf_finetune.py --pattern dilated_sparse \\
        --pattern-options '{"segment_lengths": [128, 256], "dilation_rates": [1, 2]}'
    python examples/hf_finetune.py --model path/to/llama --seq-len 2048 --device cuda --dtype bfloat16

After ``apply_dilated_sparse`` the config carries ``dilated_sparse = {"pattern": ..., ...}``, so
``save_pretrained`` / ``from_pretrained(..., attn_implementation="dilated_sparse")`` (after
``register()``) keep the pattern.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_long_sequence import default_dtype, synthetic_batch, train_steps

from dilated_sparse.integrations.transformers import apply_dilated_sparse


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """The model to fine-tune: ``--model`` if given, else a tiny Llama from a config."""
    import transformers

    if args.model:
        return transformers.AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=getattr(torch, args.dtype))
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max(2 * args.seq_len, 512), attention_dropout=0.0,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(args.seed)
    return transformers.LlamaForCausalLM(config).to(getattr(torch, args.dtype))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a transformers model name or path (default: a tiny Llama from a config)")
    p.add_argument("--pattern", default="local_window")
    p.add_argument("--pattern-options", default='{"window_size": 128}',
                   help="JSON dict of pattern options (window_size is the total window: +-64 tokens here)")
    p.add_argument("--period", type=int, default=48, help="copy distance of the generated data (tokens)")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--vocab", type=int, default=128, help="vocabulary of the generated data (tiny model)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on CUDA (the CUDA kernels take float16 / bfloat16), else float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.dtype = args.dtype or default_dtype(args.device)
    return args


def main(argv: list[str] | None = None) -> dict:
    """Fine-tune; returns ``{"losses": [...], "seconds": ...}``."""
    args = parse_args(argv)
    model = build_model(args).to(args.device)
    apply_dilated_sparse(model, args.pattern, block_size=args.block_size, **json.loads(args.pattern_options))
    print(f"attention: {model.config._attn_implementation}, pattern {model.config.dilated_sparse}")
    vocab = min(args.vocab, model.config.vocab_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    model.train()

    def step_loss(step: int) -> torch.Tensor:
        # the generated language of train_long_sequence: 90% of the tokens copy the one --period back;
        # ids from 3 up keep the tiny model's pad/bos/eos tokens out
        tokens = synthetic_batch(args.batch, args.seq_len, vocab, args.period, 0.1, generator, low=3).to(args.device)
        return model(input_ids=tokens, labels=tokens).loss

    losses, seconds = train_steps(model, optimizer, step_loss, args.steps, desc="fine-tune",
                                  no_progress=args.no_progress)
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {seconds:.1f} s (chain alone: ~{math.log(4):.2f}; "
          "lower means the copies are used)")
    return {"losses": losses, "seconds": seconds}


if __name__ == "__main__":
    main()
