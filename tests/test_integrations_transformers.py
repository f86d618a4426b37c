"""transformers integration: ``attn_implementation="dilated_sparse"`` on tiny models built from configs.

With the ``dense`` pattern the logits equal the model's own eager / SDPA attention (BERT encoder with
padding; Llama decoder, causal + GQA, with generation through a cache); with a sparse pattern the
attention equals the reference over the same layout, a cache gives the same logits as a full pass,
and a few fine-tuning steps lower the loss. No downloads.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

import dilated_sparse as ds

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("dilated_sparse.integrations.transformers")

pytestmark = pytest.mark.needs_op

VOCAB = 61


def tiny_bert(attn: str = "eager", layers: int = 2) -> torch.nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=256, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    return transformers.BertForMaskedLM._from_config(config, attn_implementation=attn).eval()


def tiny_llama(attn: str = "sdpa", layers: int = 2) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM._from_config(config, attn_implementation=attn).eval()


def ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


@pytest.mark.parametrize("baseline", ["eager", "sdpa"])
def test_bert_dense_pattern_matches_baseline_with_padding(baseline):
    model = tiny_bert(baseline)
    x = ids(2, 75)  # not a multiple of the block
    mask = torch.ones_like(x)
    mask[1, 58:] = 0  # right padding in the second row
    with torch.no_grad():
        expected = model(input_ids=x, attention_mask=mask).logits
        hf.apply_dilated_sparse(model, "dense", block_size=16)
        assert model.config._attn_implementation == "dilated_sparse"
        actual = model(input_ids=x, attention_mask=mask).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("baseline", ["eager", "sdpa"])
def test_llama_dense_pattern_matches_baseline_causal_gqa(baseline):
    model = tiny_llama(baseline)
    assert model.model.layers[0].self_attn.num_key_value_groups == 2
    x = ids(2, 70)
    with torch.no_grad():
        expected = model(input_ids=x).logits
        hf.apply_dilated_sparse(model, "dense", block_size=32)
        actual = model(input_ids=x).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_llama_left_padding_matches_sdpa_on_real_tokens():
    model = tiny_llama("sdpa")
    x = ids(2, 40)
    mask = torch.ones_like(x)
    mask[0, :7] = 0  # left padding
    with torch.no_grad():
        expected = model(input_ids=x, attention_mask=mask).logits
        hf.apply_dilated_sparse(model, "dense", block_size=16)
        actual = model(input_ids=x, attention_mask=mask).logits
    torch.testing.assert_close(actual[0, 7:], expected[0, 7:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(actual[1], expected[1], atol=1e-5, rtol=1e-5)


def test_generate_through_cache_matches_sdpa():
    model = tiny_llama("sdpa")
    prompt = ids(2, 37)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "attention_mask": torch.ones_like(prompt), "pad_token_id": 0}
    with torch.no_grad():
        expected = model.generate(prompt, **kwargs)
        hf.apply_dilated_sparse(model, "dense", block_size=16)
        actual = model.generate(prompt, **kwargs)
    assert torch.equal(actual, expected)


def test_from_config_with_registered_name_defaults_to_dense():
    hf.register()
    sparse = tiny_llama("dilated_sparse")
    dense = tiny_llama("eager")
    assert sparse.config._attn_implementation == "dilated_sparse"
    x = ids(1, 33)
    with torch.no_grad():
        torch.testing.assert_close(sparse(input_ids=x).logits, dense(input_ids=x).logits, atol=1e-5, rtol=1e-5)


class _Stub(torch.nn.Module):
    def __init__(self, spec, causal):
        super().__init__()
        self._dilated_sparse_spec = spec
        self.is_causal = causal
        self.layer_idx = 0


@pytest.mark.parametrize("causal", [False, True])
def test_attention_function_equals_reference_on_sparse_layout(causal):
    g = torch.Generator().manual_seed(3)
    b, h, hkv, s, d = 2, 4, 2, 83, 16
    q = torch.randn(b, h, s, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, s, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, s, d, generator=g, dtype=torch.float64)
    keep = torch.ones(b, s, dtype=torch.long)
    keep[0, 70:] = 0
    spec = {"pattern": "local_window", "block_size": [16, 16], "window_size": 32}
    out, weights = hf.dilated_sparse_attention_forward(_Stub(spec, causal), q, k, v, keep, scaling=0.3)
    assert weights is None and out.shape == (b, s, h, d)
    layout = hf.layout_for(spec, s, s, "cpu", causal=causal)
    assert 0 < layout.density < 1
    expected = ds.reference_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout, scale=0.3,
                                      causal=causal, key_padding_mask=keep == 0)
    torch.testing.assert_close(out, expected, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("sliding_window", [None, 20])
@pytest.mark.parametrize("q_len", [1, 13, 40])
def test_queries_at_the_end_of_the_keys_match_the_full_pass(q_len, sliding_window):
    """Cache decoding: the last q_len queries against all kv_len keys equal the last rows of the full pass."""
    g = torch.Generator().manual_seed(4)
    b, h, hkv, s, d = 2, 4, 1, 77, 8
    q = torch.randn(b, h, s, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, s, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, s, d, generator=g, dtype=torch.float64)
    stub = _Stub({"pattern": "dilated_sparse", "block_size": [16, 16], "segment_lengths": [32, 64],
                  "dilation_rates": [1, 2]}, True)
    full, _ = hf.dilated_sparse_attention_forward(stub, q, k, v, None, sliding_window=sliding_window)
    tail, _ = hf.dilated_sparse_attention_forward(stub, q[:, :, -q_len:], k, v, None, sliding_window=sliding_window)
    torch.testing.assert_close(tail, full[:, -q_len:], atol=1e-12, rtol=1e-12)
    layout = hf.layout_for(stub._dilated_sparse_spec, s, s, "cpu", causal=True)
    window = None if sliding_window is None else (sliding_window - 1, None)
    expected = ds.reference_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout, causal=True,
                                      window=window)
    torch.testing.assert_close(full, expected, atol=1e-9, rtol=1e-9)


def test_mistral_sliding_window_dense_pattern_matches_sdpa():
    config = transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=512, sliding_window=24, pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM._from_config(config, attn_implementation="sdpa").eval()
    x = ids(2, 70)
    kwargs = {"max_new_tokens": 5, "do_sample": False, "attention_mask": torch.ones_like(x), "pad_token_id": 0}
    with torch.no_grad():
        expected, expected_tokens = model(input_ids=x).logits, model.generate(x, **kwargs)
        hf.apply_dilated_sparse(model, "dense", block_size=16)
        actual, tokens = model(input_ids=x).logits, model.generate(x, **kwargs)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(tokens, expected_tokens)


def _cache_kwarg(model: torch.nn.Module, output) -> dict:
    """The cache of ``output`` as the keyword this transformers version takes (``cache`` from 5.x)."""
    if "cache" in inspect.signature(model.forward).parameters:
        return {"cache": getattr(output, "cache", None) or output.past_key_values}
    return {"past_key_values": output.past_key_values}


def test_sparse_cache_decoding_matches_full_pass():
    model = tiny_llama("sdpa")
    x = ids(2, 90)
    with torch.no_grad():
        dense = model(input_ids=x).logits
        hf.apply_dilated_sparse(model, "local_window", block_size=16, window_size=32)
        full = model(input_ids=x).logits
        first = model(input_ids=x[:, :61], use_cache=True)
        step = model(input_ids=x[:, 61:75], use_cache=True, **_cache_kwarg(model, first))  # a chunk mid-block
        last = model(input_ids=x[:, 75:76], use_cache=True, **_cache_kwarg(model, step))  # one token
    assert (full - dense).abs().max() > 1e-3  # the pattern changes the result beyond the window
    torch.testing.assert_close(first.logits, full[:, :61], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step.logits, full[:, 61:75], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last.logits, full[:, 75:76], atol=1e-5, rtol=1e-5)


def _train(model: torch.nn.Module, batch: dict[str, torch.Tensor], steps: int = 8) -> list[float]:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def test_llama_sparse_finetune_loss_falls():
    model = tiny_llama("sdpa")
    hf.apply_dilated_sparse(model, "dilated_sparse", block_size=16, segment_lengths=[32, 64], dilation_rates=[1, 2])
    x = ids(4, 96, seed=5)
    losses = _train(model, {"input_ids": x, "labels": x})
    assert losses[-1] < 0.9 * losses[0], losses


def test_bert_sparse_finetune_loss_falls():
    model = tiny_bert("eager")
    hf.apply_dilated_sparse(model, "bigbird", block_size=16, num_random_blocks=1, num_sliding_window_blocks=3,
                            num_global_blocks=1)
    x = ids(4, 80, seed=6)
    labels = torch.full_like(x, -100)
    masked = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) < 0.3
    labels[masked] = x[masked]
    inputs = x.masked_fill(masked, 2)
    losses = _train(model, {"input_ids": inputs, "labels": labels, "attention_mask": torch.ones_like(x)})
    assert losses[-1] < 0.9 * losses[0], losses


def test_layers_subset_and_config_roundtrip():
    model = tiny_llama("sdpa")
    x = ids(1, 64)
    with torch.no_grad():
        dense = model(input_ids=x).logits
        hf.apply_dilated_sparse(model, "local_window", block_size=16, window_size=16, layers=[1])
        one = model(input_ids=x).logits
        hf.apply_dilated_sparse(model, "local_window", block_size=16, window_size=16)
        both = model(input_ids=x).logits
    assert (one - dense).abs().max() > 1e-4 and (both - one).abs().max() > 1e-4
    spec = model.config.dilated_sparse
    assert spec == {"pattern": "local_window", "block_size": [16, 16], "window_size": 16}
    reloaded = transformers.LlamaConfig.from_dict(model.config.to_dict())
    assert reloaded.dilated_sparse == spec


def test_bad_pattern_or_option_raises_before_changing_the_model():
    model = tiny_bert("eager")
    with pytest.raises(ValueError, match="unknown pattern"):
        hf.apply_dilated_sparse(model, "no_such_pattern")
    with pytest.raises(TypeError, match="window_sizes"):
        hf.apply_dilated_sparse(model, "local_window", window_sizes=3)
    with pytest.raises(ValueError, match="layers"):
        hf.apply_dilated_sparse(model, "dense", layers=[7])
    assert model.config._attn_implementation == "eager"


def test_four_d_mask_and_softcap_are_refused():
    q = torch.randn(1, 2, 20, 8)
    stub = _Stub({"pattern": "dense", "block_size": [16, 16]}, False)
    with pytest.raises(ValueError, match="2-D padding mask"):
        hf.dilated_sparse_attention_forward(stub, q, q, q, torch.ones(1, 1, 20, 20, dtype=torch.bool))
    with pytest.raises(ValueError, match="softcap"):
        hf.dilated_sparse_attention_forward(stub, q, q, q, None, softcap=30.0)


def test_dropout_is_warned_once_not_applied():
    hf._warned.discard("dropout")
    q = torch.randn(1, 2, 20, 8)
    stub = _Stub({"pattern": "dense", "block_size": [16, 16]}, False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a, _ = hf.dilated_sparse_attention_forward(stub, q, q, q, None, dropout=0.1)
        b, _ = hf.dilated_sparse_attention_forward(stub, q, q, q, None, dropout=0.1)
    assert sum("dropout" in str(w.message) for w in caught) == 1
    assert torch.equal(a, b)
