"""``create_block_sparse_attention(kind, **options)`` and ``get_block_sparse_preset(name)``.

Every option either reaches a module argument that does what it says or raises: an option the
chosen kind does not take is a ``TypeError`` listing the valid ones.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from torch import nn

from ..configs import AdaptiveConfig, HierarchicalConfig, SparsePatternConfig
from ._common import check_options, check_use_memory_pool

__all__ = [
    "KINDS",
    "create_adaptive_block_sparse",
    "create_block_sparse_attention",
    "get_block_sparse_preset",
    "list_block_sparse_presets",
]

KINDS = ("auto", "base", "hierarchical", "adaptive", "multihead", "distributed")

_COMMON = ("dropout", "softmax_scale", "mixed_precision", "use_memory_pool", "enable_caching")
_CONFIG_FIELDS = ("pattern_type", "sparsity_ratio", "block_size", "local_window_size", "window_size",
                  "global_tokens", "pattern_options")
_OPTIONS: dict[str, tuple[str, ...]] = {
    "base": ("segment_lengths", "dilation_rates", "sparse_config", "cache_size", *_CONFIG_FIELDS, *_COMMON),
    "hierarchical": ("segment_lengths", "dilation_rates", "hierarchical_config", "block_size", *_COMMON),
    "adaptive": ("segment_lengths", "dilation_rates", "num_heads", "head_dim", "adaptive_config", "block_size",
                 "sparsity_ratio", *_COMMON),
    "multihead": ("embed_dim", "num_heads", "segment_lengths", "dilation_rates", "sparse_config", "sparsity_ratio",
                  "block_size", "pattern_type", "dropout", "bias", "batch_first", "add_bias_kv", "add_zero_attn",
                  "kdim", "vdim", "device", "dtype", "mixed_precision", "use_memory_pool", "enable_caching"),
}


def _pick_auto(options: dict[str, Any]) -> str:
    if "distributed_config" in options:
        return "distributed"
    if "embed_dim" in options:
        return "multihead"
    if "hierarchical_config" in options:
        return "hierarchical"
    if "adaptive_config" in options:
        return "adaptive"
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return "distributed"
    return "base"


def create_block_sparse_attention(kind: str = "auto", **options: Any) -> nn.Module:
    """Build a block-sparse attention module.

    Args:
        kind: ``'base'`` (:class:`~dilated_sparse.modules.BlockSparseRingDilatedAttention`),
            ``'hierarchical'`` (:class:`~dilated_sparse.modules.BlockSparseHierarchical`),
            ``'adaptive'`` (:class:`~dilated_sparse.modules.BlockSparseAdaptive`),
            ``'multihead'`` (:class:`~dilated_sparse.modules.BlockSparseRingMultiheadDilatedAttention`,
            an ``nn.MultiheadAttention`` drop-in), ``'distributed'`` (the ring module of
            :mod:`dilated_sparse.distributed`) or ``'auto'``: ``distributed`` when a
            ``distributed_config`` is given or ``torch.distributed`` runs with several ranks,
            ``multihead`` when ``embed_dim`` is given, ``hierarchical`` / ``adaptive`` when their
            config is given, else ``base``.
        **options: the chosen module's arguments. For ``base``, the config fields
            (``pattern_type``, ``sparsity_ratio``, ``block_size``, ``local_window_size``/
            ``window_size``, ``global_tokens``, ``pattern_options``) build or override the
            ``sparse_config``. For ``adaptive``, ``sparsity_ratio`` (fraction computed) sets
            ``adaptive_config.base_sparsity = 1 - sparsity_ratio``.

    Raises:
        ValueError: unknown kind.
        TypeError: an option the kind does not take (the message lists the valid ones).
    """
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    if kind == "auto":
        kind = _pick_auto(options)
    if kind == "distributed":
        return _create_distributed(options)
    check_options(f"create_block_sparse_attention({kind!r})", options, _OPTIONS[kind])
    opts = dict(options)
    if kind == "base":
        from .block_sparse import BlockSparseRingDilatedAttention

        return BlockSparseRingDilatedAttention(**opts)
    if kind == "hierarchical":
        from .hierarchical import BlockSparseHierarchical

        return BlockSparseHierarchical(**opts)
    if kind == "adaptive":
        from .adaptive import BlockSparseAdaptive

        if "use_memory_pool" in opts:
            check_use_memory_pool(opts.pop("use_memory_pool"))
        if "sparsity_ratio" in opts:
            ratio = opts.pop("sparsity_ratio")
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
                raise ValueError(f"sparsity_ratio must lie in (0, 1], got {ratio!r}")
            base = opts.get("adaptive_config") or AdaptiveConfig()
            if "adaptive_config" in opts and abs(base.base_sparsity - (1.0 - ratio)) > 1e-12:
                raise ValueError(
                    f"sparsity_ratio={ratio} (fraction computed) contradicts adaptive_config.base_sparsity="
                    f"{base.base_sparsity} (fraction skipped); give one of them"
                )
            opts["adaptive_config"] = dataclasses.replace(base, base_sparsity=1.0 - float(ratio))  # validated copy
        return BlockSparseAdaptive(**opts)
    # multihead
    from .multihead import BlockSparseRingMultiheadDilatedAttention

    for required in ("embed_dim", "num_heads"):
        if required not in opts:
            raise TypeError(f"create_block_sparse_attention('multihead') needs {required}=")
    if "pattern_type" in opts:
        pattern_type = opts.pop("pattern_type")
        config = opts.get("sparse_config")
        opts["sparse_config"] = (config.replace(pattern_type=pattern_type) if config is not None
                                 else SparsePatternConfig(pattern_type=pattern_type))
    return BlockSparseRingMultiheadDilatedAttention(**opts)


def _create_distributed(options: dict[str, Any]) -> nn.Module:
    """The ``'distributed'`` kind: imported lazily from :mod:`dilated_sparse.distributed`."""
    try:
        from .. import distributed
    except ImportError as error:  # pragma: no cover - depends on the distributed package
        raise ImportError(f"create_block_sparse_attention('distributed') needs dilated_sparse.distributed: {error}") from error
    cls = getattr(distributed, "BlockSparseRingDistributedDilatedAttention", None)
    config_cls = getattr(distributed, "DistributedSparseConfig", None)
    if cls is None or config_cls is None:
        raise ImportError(
            "create_block_sparse_attention('distributed') needs "
            "dilated_sparse.distributed.BlockSparseRingDistributedDilatedAttention, which is not available"
        )
    opts = dict(options)
    # The guides pass DistributedSparseConfig fields (e.g. enable_deepspeed_integration) directly.
    dist_fields = {f.name for f in dataclasses.fields(config_cls)}
    moved = {name: opts.pop(name) for name in list(opts) if name in dist_fields}
    if moved:
        base = opts.get("distributed_config")
        opts["distributed_config"] = dataclasses.replace(base, **moved) if base is not None else config_cls(**moved)
    pattern_fields = {name: opts.pop(name) for name in list(opts) if name in _CONFIG_FIELDS}
    if pattern_fields:
        config = opts.get("sparse_config")
        opts["sparse_config"] = (config.replace(**pattern_fields) if config is not None
                                 else SparsePatternConfig(**pattern_fields))
    return cls(**opts)


_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "ultra_sparse": ("base", {"pattern_type": "dilated_sparse", "sparsity_ratio": 0.01, "block_size": 128,
                              "segment_lengths": [2048, 4096, 8192], "dilation_rates": [1, 2, 4]}),
    "dilated": ("base", {"pattern_type": "dilated_sparse", "sparsity_ratio": 0.1, "block_size": 64,
                         "segment_lengths": [1024, 2048, 4096], "dilation_rates": [1, 2, 4]}),
    "local": ("base", {"pattern_type": "local_window", "local_window_size": 512, "block_size": 64}),
    "global_local": ("base", {"pattern_type": "global_local", "global_tokens": 64, "local_window_size": 512,
                              "block_size": 64}),
    "bigbird": ("base", {"pattern_type": "bigbird", "block_size": 64,
                         "pattern_options": {"num_global_blocks": 1, "num_sliding_window_blocks": 3,
                                             "num_random_blocks": 2}}),
    "longformer": ("base", {"pattern_type": "longformer", "local_window_size": 512, "global_tokens": 1,
                            "block_size": 64}),
    "hierarchical_long": ("hierarchical", {"hierarchical_config": [
        {"stride": 64, "window_size": 512, "block_size": 64},
        {"stride": 512, "window_size": 4096, "block_size": 128},
        {"stride": 2048, "window_size": -1, "block_size": 256},
    ]}),
    "hierarchical_fine": ("hierarchical", {"hierarchical_config": [
        {"stride": 16, "window_size": 128, "block_size": 32},
        {"stride": 64, "window_size": 512, "block_size": 64},
        {"stride": 256, "window_size": 2048, "block_size": 128},
    ]}),
    "adaptive": ("adaptive", {}),
}


def list_block_sparse_presets() -> list[str]:
    """Names accepted by :func:`get_block_sparse_preset`."""
    return sorted(_PRESETS)


def get_block_sparse_preset(name: str, **overrides: Any) -> nn.Module:
    """A ready module from a named preset; ``overrides`` replace the preset's options.

    Presets: ``ultra_sparse`` (dilated, 1 % of 128-blocks), ``dilated`` (10 %), ``local``
    (512-token window), ``global_local`` (64 global tokens + 512 window), ``bigbird``,
    ``longformer`` (512 window + 1 global token), ``hierarchical_long``,
    ``hierarchical_fine``, ``adaptive``.
    """
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(list_block_sparse_presets())}")
    kind, options = _PRESETS[name]
    options = copy.deepcopy(options)
    if kind == "hierarchical" and isinstance(options.get("hierarchical_config"), list):
        options["hierarchical_config"] = HierarchicalConfig(level_configs=options["hierarchical_config"])
    options.update(overrides)
    if kind == "base" and "pattern_options" in overrides and "pattern_options" in _PRESETS[name][1]:
        options["pattern_options"] = {**_PRESETS[name][1]["pattern_options"], **overrides["pattern_options"]}
    return create_block_sparse_attention(kind, **options)


def create_adaptive_block_sparse(
    embed_dim: int | None = None,
    num_heads: int | None = None,
    segment_lengths: list[int] | None = None,
    dilation_rates: list[int] | None = None,
    **options: Any,
) -> nn.Module:
    """The adaptive guide's helper: a :class:`~dilated_sparse.modules.BlockSparseAdaptive` for
    ``num_heads`` heads of ``embed_dim // num_heads`` dims (other options as
    :func:`create_block_sparse_attention` ``('adaptive')``)."""
    head_dim = None
    if embed_dim is not None:
        if num_heads is None or embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        head_dim = embed_dim // num_heads
    return create_block_sparse_attention("adaptive", num_heads=num_heads, head_dim=head_dim,
                                         segment_lengths=segment_lengths, dilation_rates=dilation_rates, **options)


def get_hierarchical_presets() -> dict[str, HierarchicalConfig]:
    """The hierarchical guide's named level sets: ``standard`` (the default three levels),
    ``fine_grained`` (four levels, finer detail), ``long_range`` (wide windows for long
    sequences) and ``ultra_sparse`` (few, far-apart positions)."""
    levels = {
        "standard": [{"stride": 64, "window_size": 256, "block_size": 64},
                     {"stride": 256, "window_size": 1024, "block_size": 128},
                     {"stride": 1024, "window_size": -1, "block_size": 256}],
        "fine_grained": [{"stride": 32, "window_size": 128, "block_size": 32},
                         {"stride": 128, "window_size": 512, "block_size": 64},
                         {"stride": 512, "window_size": 2048, "block_size": 128},
                         {"stride": 2048, "window_size": -1, "block_size": 256}],
        "long_range": _PRESETS["hierarchical_long"][1]["hierarchical_config"],
        "ultra_sparse": [{"stride": 256, "window_size": 512, "block_size": 128},
                         {"stride": 4096, "window_size": -1, "block_size": 256}],
    }
    return {name: HierarchicalConfig(level_configs=copy.deepcopy(value)) for name, value in levels.items()}
