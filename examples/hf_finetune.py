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
import time

import torch

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


def generated_batch(batch: int, seq_len: int, vocab: int, period: int, generator: torch.Generator) -> torch.Tensor:
    """``[batch, seq_len]`` generated tokens: a sparse Markov chain (each token has 4 likely
    successors: learnable from the current token alone, loss -> ~ln 4) in which, after the first
    ``period`` tokens, 90% of the tokens copy the one ``period`` positions back. The copies are
    predictable only by attending ``period`` tokens back, so the pattern must reach that far (the
    default window does) for the loss to go below ~ln 4."""
    successors = torch.randint(3, vocab, (vocab, 4), generator=torch.Generator().manual_seed(1234))
    tokens = torch.empty(batch, seq_len, dtype=torch.long)
    tokens[:, 0] = torch.randint(3, vocab, (batch,), generator=generator)
    choice = torch.randint(4, (batch, seq_len), generator=generator)
    fresh = torch.rand(batch, seq_len, generator=generator) < 0.1
    for t in range(1, seq_len):
        chain = successors[tokens[:, t - 1], choice[:, t]]
        tokens[:, t] = chain if t < period else torch.where(fresh[:, t], chain, tokens[:, t - period])
    return tokens


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
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Fine-tune; returns ``{"losses": [...], "seconds": ...}``."""
    args = parse_args(argv)
    model = build_model(args).to(args.device)
    apply_dilated_sparse(model, args.pattern, block_size=args.block_size, **json.loads(args.pattern_options))
    print(f"attention: {model.config._attn_implementation}, pattern {model.config.dilated_sparse}")
    vocab = min(args.vocab, model.config.vocab_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    try:
        from tqdm.auto import trange
    except ImportError:
        trange = None
    steps = trange(args.steps, desc="fine-tune", disable=args.no_progress) if trange else range(args.steps)
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    for step in steps:
        tokens = generated_batch(args.batch, args.seq_len, vocab, args.period, generator).to(args.device)
        loss = model(input_ids=tokens, labels=tokens).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if trange and not args.no_progress:
            steps.set_postfix(loss=f"{losses[-1]:.3f}")
        elif step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {losses[-1]:.4f}")
    seconds = time.perf_counter() - start
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {seconds:.1f} s (chain alone: ~{math.log(4):.2f}; "
          "lower means the copies are used)")
    return {"losses": losses, "seconds": seconds}


if __name__ == "__main__":
    main()
