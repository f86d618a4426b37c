"""The pattern registry: names -> generator functions, and :func:`make_layout`.

A generator is a function taking keyword arguments only: ``seq_len_q``, ``seq_len_k`` (optional),
``block_size`` and its own options, returning a :class:`BlockSparseLayout`. Register one with
:func:`register_pattern`; modules, configs and the CLI build layouts through :func:`make_layout`
so that every pattern has a single implementation.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from ..layout import BlockSparseLayout
from ._core import causal_filter

__all__ = [
    "PatternFn",
    "available_patterns",
    "get_pattern",
    "make_layout",
    "pattern_options",
    "register_pattern",
]

PatternFn = Callable[..., BlockSparseLayout]

_PATTERNS: dict[str, PatternFn] = {}
_ALIASES: dict[str, str] = {}
_GEOMETRY_ARGS = ("seq_len_q", "seq_len_k", "block_size")
_SPEC_NAME_KEYS = ("pattern", "pattern_type")


def _normalize(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def register_pattern(
    name: str,
    fn: PatternFn | None = None,
    *,
    aliases: tuple[str, ...] = (),
    overwrite: bool = False,
) -> Any:
    """Register a generator under ``name`` (and ``aliases``); a decorator when ``fn`` is omitted.

    ``register_pattern("mine", my_fn)`` registers and returns ``my_fn``;
    ``@register_pattern("mine")`` does the same as a decorator. The function must accept the
    keyword arguments ``seq_len_q``, ``seq_len_k``, ``block_size`` (or ``**kwargs``) plus its
    options, and return a :class:`BlockSparseLayout`. Names are case-insensitive (``-`` reads
    as ``_``). Re-registering a taken name raises ``ValueError`` unless ``overwrite=True``.
    """
    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"register_pattern: name must be a non-empty string, got {name!r}")
    if isinstance(aliases, str):
        aliases = (aliases,)
    canonical = _normalize(name)
    names = [canonical, *(_normalize(a) for a in aliases)]

    def decorator(fn: PatternFn) -> PatternFn:
        if not callable(fn):
            raise TypeError("register_pattern: the generator must be callable")
        params = inspect.signature(fn).parameters
        has_var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
        missing = [a for a in _GEOMETRY_ARGS if a not in params]
        if missing and not has_var_kw:
            raise TypeError(
                f"register_pattern({name!r}): the generator must accept the keyword arguments "
                f"{', '.join(_GEOMETRY_ARGS)} (missing {', '.join(missing)})"
            )
        for n in names:
            if not overwrite and (n in _PATTERNS or n in _ALIASES):
                raise ValueError(f"pattern name {n!r} is already registered (pass overwrite=True)")
        _PATTERNS[canonical] = fn
        _ALIASES.pop(canonical, None)
        for alias in names[1:]:
            _PATTERNS.pop(alias, None)
            _ALIASES[alias] = canonical
        return fn

    return decorator if fn is None else decorator(fn)


def available_patterns() -> list[str]:
    """Sorted canonical names of the registered patterns (aliases not included)."""
    return sorted(_PATTERNS)


def _aliases_text() -> str:
    if not _ALIASES:
        return ""
    return "; aliases: " + ", ".join(f"{a} -> {c}" for a, c in sorted(_ALIASES.items()))


def get_pattern(name: str) -> PatternFn:
    """The generator registered as ``name`` (or an alias); ValueError listing valid names."""
    if not isinstance(name, str):
        raise TypeError(f"pattern name must be a string, got {type(name).__name__}")
    key = _normalize(name)
    key = _ALIASES.get(key, key)
    fn = _PATTERNS.get(key)
    if fn is None:
        raise ValueError(
            f"unknown pattern {name!r}; valid patterns: {', '.join(available_patterns())}{_aliases_text()}"
        )
    return fn


def pattern_options(name: str) -> tuple[str, ...]:
    """Option names a pattern accepts (besides ``seq_len_q``, ``seq_len_k``, ``block_size``)."""
    fn = get_pattern(name)
    return tuple(
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in _GEOMETRY_ARGS
    )


def _accepts_var_kwargs(fn: Callable[..., Any]) -> bool:
    return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())


def _check_options(name: str, fn: PatternFn, options: Mapping[str, Any]) -> None:
    if _accepts_var_kwargs(fn):
        return
    valid = pattern_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(
            f"pattern {name!r} got unknown option(s) {', '.join(unknown)}; valid options: {', '.join(valid)}"
        )


def _split_spec(spec: Any, options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """``(name_or_layout_or_callable, options)`` from a spec (dict, tuple, name, ...)."""
    if isinstance(spec, Mapping):
        d = dict(spec)
        found = [k for k in _SPEC_NAME_KEYS if k in d]
        if not found:
            raise ValueError(f"a pattern spec dict needs a 'pattern' key naming the pattern, got keys {sorted(d)}")
        names = {d.pop(k) for k in found}
        if len(names) != 1:
            raise ValueError(f"pattern spec names conflicting patterns: {sorted(map(str, names))}")
        inner = names.pop()
    elif isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], Mapping):
        inner, d = spec[0], dict(spec[1])
    else:
        return spec, options
    for key, value in options.items():
        if key in d and d[key] != value:
            raise ValueError(f"option {key!r} given twice with different values: {d[key]!r} and {value!r}")
    return inner, {**d, **options}


def make_layout(
    name_or_spec: Any,
    *,
    seq_len_q: int,
    seq_len_k: int | None = None,
    block_size: Any = None,
    **options: Any,
) -> BlockSparseLayout:
    """Build the layout of a named pattern (the one entry point modules and the CLI use).

    Args:
        name_or_spec: a registered name (``"local_window"``, ``"bigbird"``, ...), a dict
            ``{"pattern": name, **options}``, a ``(name, options)`` pair, a callable generator
            (called with the same keyword arguments), or a ready :class:`BlockSparseLayout`
            (checked against the sizes and returned; only ``causal`` (drops the blocks wholly
            after their query block) and ``device`` apply to it).
        seq_len_q, seq_len_k, block_size: the geometry (``block_size`` int or ``(bq, bk)``).
        **options: the pattern's options (see :func:`pattern_options`).

    Raises:
        ValueError: unknown pattern name (the message lists the valid ones) or bad values.
        TypeError: unknown option for that pattern (the message lists the valid ones).
    """
    inner, opts = _split_spec(name_or_spec, dict(options))
    if isinstance(inner, BlockSparseLayout):
        causal = opts.pop("causal", False)
        device = opts.pop("device", None)
        if opts:
            raise TypeError(
                f"options {sorted(opts)} cannot be applied to a ready BlockSparseLayout (only causal, device)"
            )
        want_k = seq_len_q if seq_len_k is None else seq_len_k
        if (inner.seq_len_q, inner.seq_len_k) != (seq_len_q, want_k):
            raise ValueError(
                f"layout was built for seq_len_q={inner.seq_len_q}, seq_len_k={inner.seq_len_k}, "
                f"not seq_len_q={seq_len_q}, seq_len_k={want_k}"
            )
        if block_size is not None:
            from ..layout import normalize_block_size

            if normalize_block_size(block_size) != inner.block_size:
                raise ValueError(f"layout has block_size={inner.block_size}, not {block_size!r}")
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        layout = causal_filter(inner) if causal else inner
        return layout if device is None else layout.to(device)
    geometry: dict[str, Any] = {"seq_len_q": seq_len_q, "seq_len_k": seq_len_k}
    if block_size is not None:
        geometry["block_size"] = block_size
    if isinstance(inner, str):
        fn = get_pattern(inner)
        _check_options(inner, fn, opts)
        params = inspect.signature(fn).parameters
        if "block_size" not in geometry and "blocksize" not in opts:
            p = params.get("block_size")
            if p is not None and p.default is inspect.Parameter.empty:
                raise TypeError(f"pattern {inner!r} needs block_size= (an int or a pair (block_q, block_k))")
    elif callable(inner):
        fn = inner
    else:
        raise TypeError(
            "name_or_spec must be a pattern name, a {'pattern': name, ...} dict, a (name, options) pair, "
            f"a callable or a BlockSparseLayout, got {type(inner).__name__}"
        )
    layout = fn(**geometry, **opts)
    if not isinstance(layout, BlockSparseLayout):
        raise TypeError(f"pattern generator returned {type(layout).__name__}, expected a BlockSparseLayout")
    return layout
