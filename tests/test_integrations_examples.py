"""The example scripts run end to end on tiny settings and their loss falls (examples/*.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
pytestmark = pytest.mark.needs_op


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_train_long_sequence_loss_falls(capsys):
    example = load("train_long_sequence")
    # 400 tokens: not a multiple of the 32-token block, so the last block is partial
    result = example.main(["--seq-len", "400", "--batch", "2", "--steps", "15", "--dim", "64", "--block-size", "32",
                           "--pattern-options", '{"window_size": 96}', "--no-progress", "--device", "cpu"])
    losses = result["losses"]
    assert len(losses) == 15 and 0 < result["density"] < 0.5
    assert losses[-1] < 0.85 * losses[0], losses
    assert "loss" in capsys.readouterr().out


def test_synthetic_batch_copies_period_back():
    example = load("train_long_sequence")
    import torch

    tokens = example.synthetic_batch(3, 500, 64, 48, 0.0, torch.Generator().manual_seed(0))
    assert tokens.shape == (3, 500)
    assert torch.equal(tokens[:, 48:], tokens[:, :-48])


def test_hf_finetune_loss_falls():
    pytest.importorskip("transformers")
    example = load("hf_finetune")
    result = example.main(["--seq-len", "96", "--batch", "4", "--steps", "12", "--block-size", "16",
                           "--pattern-options", '{"window_size": 64}', "--no-progress", "--device", "cpu"])
    losses = result["losses"]
    assert losses[-1] < 0.85 * losses[0], losses


def test_lightning_example_runs_or_skips(capsys):
    load("train_long_sequence")
    example = load("lightning_module")
    result = example.main(["--seq-len", "200", "--batch", "2", "--max-steps", "6", "--dim", "32", "--block-size", "32",
                           "--pattern-options", '{"window_size": 64}', "--no-progress", "--accelerator", "cpu"])
    if example.import_lightning() is None:
        assert result is None and "skipping" in capsys.readouterr().out
    else:
        assert len(result["losses"]) == 6 and result["losses"][-1] < result["losses"][0]
