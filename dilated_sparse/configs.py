"""Validated configuration dataclasses for the block-sparse attention modules.

Every config checks its fields when built (``ValueError``/``TypeError`` naming the field) and
rejects unknown keyword arguments with a ``TypeError`` that lists the valid ones, so a misspelt
option never passes silently.

* :class:`SparsePatternConfig`: a named pattern (``'local_window'``, ``'dilated_sparse'``,
  ``'global_local'`` or any pattern registered in :mod:`dilated_sparse.patterns`) and its options.
* :class:`HierarchicalConfig`: the levels of a hierarchical pattern.
* :class:`AdaptiveConfig`: the learned (content-adaptive) layout of
  :class:`~dilated_sparse.modules.BlockSparseAdaptive`.
* ``DistributedSparseConfig``: re-exported (lazily) from :mod:`dilated_sparse.distributed.config`.

Convention, as in the guides: ``SparsePatternConfig.sparsity_ratio`` is the fraction of blocks
that *are computed* (0.1 = 90 % sparse), while ``AdaptiveConfig.base_sparsity`` is the fraction
that is *skipped* (0.9 = 90 % sparse).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from .layout import BlockSparseLayout

__all__ = [
    "AdaptiveConfig",
    "HierarchicalConfig",
    "SparsePatternConfig",
    "config_fields",
]
if importlib.util.find_spec(f"{__package__}.distributed.config") is not None:
    __all__.append("DistributedSparseConfig")

_C = TypeVar("_C")

# Keyword aliases accepted by the configs: alias -> field.
_ALIASES: dict[type, dict[str, str]] = {}


def config_fields(cls: type) -> list[str]:
    """Names a config class accepts as keyword arguments (fields and aliases), sorted."""
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    return sorted(names + list(_ALIASES.get(cls, {})))


def _strict(aliases: dict[str, str] | None = None) -> Callable[[type[_C]], type[_C]]:
    """Class decorator: unknown keywords -> TypeError listing the valid ones; apply aliases."""

    def wrap(cls: type[_C]) -> type[_C]:
        _ALIASES[cls] = dict(aliases or {})
        original = cls.__init__

        @functools.wraps(original)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            for alias, target in _ALIASES[cls].items():
                if alias in kwargs:
                    value = kwargs.pop(alias)
                    if target in kwargs and kwargs[target] != value:
                        raise ValueError(
                            f"{cls.__name__}: {alias!r} is an alias of {target!r}; got both "
                            f"{alias}={value!r} and {target}={kwargs[target]!r}"
                        )
                    kwargs[target] = value
            valid = config_fields(cls)
            unknown = sorted(set(kwargs) - set(valid))
            if unknown:
                raise TypeError(
                    f"{cls.__name__} got unknown option(s) {unknown}; valid options are {valid}"
                )
            original(self, *args, **kwargs)
            positional = [f.name for f in dataclasses.fields(cls) if f.init][: len(args)]
            given = set(positional) | set(kwargs)
            check_given = getattr(self, "_check_given", None)
            if check_given is not None:
                check_given(given)
            object.__setattr__(self, "_explicit", given)

        cls.__init__ = __init__  # type: ignore[method-assign]
        return cls

    return wrap


def _check_int(owner: str, name: str, value: Any, *, minimum: int | None = None,
               allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}.{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{owner}.{name} must be >= {minimum}, got {value}")


def _check_fraction(owner: str, name: str, value: Any, *, low_open: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{owner}.{name} must be a float, got {value!r}")
    if (value <= 0.0 if low_open else value < 0.0) or value > 1.0:
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{owner}.{name} must lie in {interval}, got {value}")


def _check_int_list(owner: str, name: str, value: Any) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{owner}.{name} must be a list of positive ints, got {value!r}")
    items = list(value)
    if not items:
        raise ValueError(f"{owner}.{name} must not be empty")
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or item <= 0:
            raise ValueError(f"{owner}.{name} must hold positive ints, got {items!r}")
    return items


_SUPPORTED_BLOCKS = (16, 32, 64, 128, 256)

# SparsePatternConfig field -> the pattern options make_layout passes it as. pattern_options may
# set such an option only when the field was not given (or is given the same value).
_FIELD_OPTIONS: dict[str, tuple[str, ...]] = {
    "sparsity_ratio": ("density", "sparsity_ratio"),
    "local_window_size": ("window_size", "window"),
    "global_tokens": ("global_tokens",),
    "segment_lengths": ("segment_lengths",),
    "dilation_rates": ("dilation_rates",),
}
# The geometry make_layout always passes itself; never taken from pattern_options.
_GEOMETRY_OPTIONS = {"seq_len_q": "make_layout's seq_len_q", "seq_len_k": "make_layout's seq_len_k",
                     "block_size": "SparsePatternConfig.block_size",
                     "causal": "make_layout's causal (a module's is_causal)", "device": "make_layout's device"}


def _same_option(a: Any, b: Any) -> bool:
    """Whether two option values are equal (lists and tuples alike); uncomparable -> False."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):
        return False


def _check_block(owner: str, name: str, value: Any) -> None:
    _check_int(owner, name, value)
    if value not in _SUPPORTED_BLOCKS:
        raise ValueError(f"{owner}.{name} must be one of {_SUPPORTED_BLOCKS}, got {value}")


class _ValidatedConfig:
    """Base of the configs: a field set after construction is validated like one given to the
    constructor (``__post_init__`` and :meth:`_check_given` run again); on error the old value is
    kept and the ``TypeError``/``ValueError`` names the field.

    Validation starts once the :func:`_strict` constructor has recorded which fields were given
    (``_explicit``); a field assigned later counts as given by the user.
    """

    def __post_init__(self) -> None:  # overridden by every config
        pass

    def _check_given(self, given: set[str]) -> None:
        """Checks that depend on which fields the user gave (``given``); none by default."""

    def __setattr__(self, name: str, value: Any) -> None:
        """Fields set after construction are validated (the old value is kept on error)."""
        explicit = self.__dict__.get("_explicit")
        if (explicit is None or self.__dict__.get("_validating")
                or name not in {f.name for f in dataclasses.fields(self)}):  # type: ignore[arg-type]
            object.__setattr__(self, name, value)
            return
        old = self.__dict__.get(name)
        object.__setattr__(self, name, value)
        object.__setattr__(self, "_validating", True)
        try:
            self.__post_init__()
            self._check_given(explicit | {name})
        except (TypeError, ValueError):
            object.__setattr__(self, name, old)
            raise
        finally:
            object.__setattr__(self, "_validating", False)
        explicit.add(name)

    def is_explicit(self, name: str) -> bool:
        """Whether field ``name`` was given by the user (at construction or set later)."""
        return name in self.__dict__.get("_explicit", set())


@_strict(aliases={"window_size": "local_window_size"})
@dataclass
class SparsePatternConfig(_ValidatedConfig):
    """A named block-sparse pattern and its options (the guides' ``SparsePatternConfig``).

    Args:
        pattern_type: ``'local_window'``, ``'dilated_sparse'``, ``'global_local'`` or any name in
            :func:`dilated_sparse.patterns.available_patterns`.
        sparsity_ratio: fraction of blocks computed, in ``(0, 1]`` (0.1 = 90 % sparse). Used by
            the patterns that take a target density (``dilated_sparse``, ``random``, ...); the
            layout's real density is reported by ``get_pattern_stats``.
        block_size: block edge in tokens (16, 32, 64, 128 or 256).
        local_window_size: local window in tokens (alias ``window_size``), for the patterns
            with a local part.
        global_tokens: number of leading global tokens (``global_local``, ``longformer``,
            ``bigbird``).
        dilation_rates: dilation per segment length (``dilated_sparse``).
        segment_lengths: LongNet segment lengths in tokens (``dilated_sparse``).
        min_sparsity, max_sparsity: bounds that ``sparsity_ratio`` must stay within, also when
            changed later by ``set_sparsity_ratio`` or a scheduler.
        enable_caching: cache built layouts per (sequence lengths, device); when False a layout
            is rebuilt on every call.
        pattern_options: extra keyword options passed verbatim to the pattern generator (for
            example ``{"num_random_blocks": 2}`` for BigBird). It may also set an option a field
            maps to (``density``/``sparsity_ratio`` <- ``sparsity_ratio``, ``window_size``/
            ``window`` <- ``local_window_size``, ``global_tokens``, ``segment_lengths``,
            ``dilation_rates``) when that field was *not given* (it then replaces the field's
            default); when the field was given (at construction, by ``replace`` or set later,
            even to its default value) and ``pattern_options`` sets its option to another value,
            ``ValueError`` names both, so neither value is silently dropped. The geometry
            (``seq_len_q``, ``seq_len_k``, ``block_size``), ``causal`` and ``device`` (the
            call's) cannot be set here.

    Only the options the chosen pattern accepts are passed to it; setting an option the
    pattern does not take (to a non-default value) raises ``ValueError`` when the layout is
    built, naming the pattern's options.
    """

    pattern_type: str = "dilated_sparse"
    sparsity_ratio: float = 0.1
    block_size: int = 64
    local_window_size: int = 256
    global_tokens: int = 64
    dilation_rates: list[int] | None = None
    segment_lengths: list[int] | None = None
    min_sparsity: float = 0.0
    max_sparsity: float = 1.0
    enable_caching: bool = True
    pattern_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        owner = "SparsePatternConfig"
        if not isinstance(self.pattern_type, str) or not self.pattern_type:
            raise TypeError(f"{owner}.pattern_type must be a non-empty str, got {self.pattern_type!r}")
        _check_fraction(owner, "sparsity_ratio", self.sparsity_ratio)
        _check_block(owner, "block_size", self.block_size)
        _check_int(owner, "local_window_size", self.local_window_size, minimum=1)
        _check_int(owner, "global_tokens", self.global_tokens, minimum=0)
        self.dilation_rates = _check_int_list(owner, "dilation_rates", self.dilation_rates)
        self.segment_lengths = _check_int_list(owner, "segment_lengths", self.segment_lengths)
        if (self.dilation_rates is not None and self.segment_lengths is not None
                and len(self.dilation_rates) != len(self.segment_lengths)):
            raise ValueError(
                f"{owner}: segment_lengths {self.segment_lengths} and dilation_rates "
                f"{self.dilation_rates} must have the same length"
            )
        _check_fraction(owner, "min_sparsity", self.min_sparsity, low_open=False)
        _check_fraction(owner, "max_sparsity", self.max_sparsity, low_open=False)
        if self.min_sparsity > self.max_sparsity:
            raise ValueError(f"{owner}: min_sparsity {self.min_sparsity} > max_sparsity {self.max_sparsity}")
        self.check_sparsity_ratio(self.sparsity_ratio)
        if not isinstance(self.enable_caching, bool):
            raise TypeError(f"{owner}.enable_caching must be a bool, got {self.enable_caching!r}")
        if not isinstance(self.pattern_options, dict):
            raise TypeError(f"{owner}.pattern_options must be a dict, got {self.pattern_options!r}")
        for key, owned_by in _GEOMETRY_OPTIONS.items():
            if key in self.pattern_options:
                raise ValueError(f"{owner}.pattern_options must not set {key!r}; it is {owned_by}")
        from .patterns import get_pattern

        get_pattern(self.pattern_type)  # ValueError listing the registered patterns

    def _check_given(self, given: set[str]) -> None:
        """``ValueError`` when ``pattern_options`` sets an option to another value than a field the
        user gave (``given``) or changed from its default maps to (see the class docstring)."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, options in _FIELD_OPTIONS.items():
            value = getattr(self, name)
            if name not in given and _same_option(value, defaults[name]):
                continue
            for option in options:
                if option in self.pattern_options and not _same_option(value, self.pattern_options[option]):
                    raise ValueError(
                        f"SparsePatternConfig.{name}={value!r} was given but pattern_options[{option!r}]="
                        f"{self.pattern_options[option]!r} sets the same pattern option to another value; "
                        f"give it in one place"
                    )

    @property
    def window_size(self) -> int:
        """Alias of :attr:`local_window_size`."""
        return self.local_window_size

    @window_size.setter
    def window_size(self, value: int) -> None:
        self.local_window_size = value

    def check_sparsity_ratio(self, ratio: float) -> float:
        """Validate a (new) ``sparsity_ratio`` against the type and the min/max bounds."""
        _check_fraction("SparsePatternConfig", "sparsity_ratio", ratio)
        if not self.min_sparsity <= ratio <= self.max_sparsity:
            raise ValueError(
                f"SparsePatternConfig.sparsity_ratio={ratio} is outside [min_sparsity, max_sparsity]"
                f" = [{self.min_sparsity}, {self.max_sparsity}]"
            )
        return float(ratio)

    def fingerprint(self) -> tuple[Any, ...]:
        """A hashable summary of everything that shapes the layout (used as a cache key)."""
        values = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                value = tuple(value)
            elif isinstance(value, dict):
                value = repr(sorted(value.items(), key=lambda item: item[0]))
            values.append(value)
        return (*values, tuple(sorted(self.__dict__.get("_explicit", set()))))

    def replace(self, **changes: Any) -> SparsePatternConfig:
        """A validated copy with some fields changed.

        The copy's given fields are this config's given fields (and any changed in place from
        their default) plus ``changes``; the other fields keep their defaults, so the copy is
        checked exactly as if built with those keywords.
        """
        values: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if self.is_explicit(f.name) or not _same_option(value, default):
                values[f.name] = dict(value) if isinstance(value, dict) else value
        for alias, target in _ALIASES[SparsePatternConfig].items():
            if alias in changes:
                changes[target] = changes.pop(alias)
        values.update(changes)
        return SparsePatternConfig(**values)

    def make_layout(
        self,
        seq_len_q: int,
        seq_len_k: int | None = None,
        *,
        causal: bool = False,
        num_heads: int | None = None,
        device: Any = None,
        segment_lengths: Sequence[int] | None = None,
        dilation_rates: Sequence[int] | None = None,
    ) -> BlockSparseLayout:
        """Build this config's layout through :func:`dilated_sparse.patterns.make_layout`.

        How the fields reach the pattern generator:

        * ``sparsity_ratio`` (fraction computed) becomes the generator's ``density`` for the
          patterns that take a target density. For patterns that take both a window and a target
          (``local_window``, ``global_local``) the window is used unless ``sparsity_ratio`` was
          given; when both ``sparsity_ratio`` and ``local_window_size`` were given the layout is
          the intersection of the two (the window bounds the reach, the ratio bounds the count).
          The target is raised to at least one key block per query-block row (``1 / nkb``) so
          no query is left without keys; ``get_pattern_stats`` reports the density reached.
        * ``local_window_size`` -> ``window_size``; ``global_tokens``, ``segment_lengths`` and
          ``dilation_rates`` go to the patterns that take them; ``segment_lengths`` /
          ``dilation_rates`` passed here (a module's own) are used when the config has none.
        * A field the user set that the pattern does not take raises ``ValueError`` (naming the
          pattern's options); ``pattern_options`` are passed verbatim (unknown ones raise
          ``TypeError``). An option that ``pattern_options`` and a given field (or the
          ``segment_lengths``/``dilation_rates`` passed here) both set to different values
          raises ``ValueError`` instead of one silently winning.

        Args:
            seq_len_q, seq_len_k: sequence lengths in tokens (no multiple of anything needed).
            causal: build the causal variant (blocks wholly after the query block dropped).
            num_heads: number of query heads, used when ``pattern_options`` asks for
                ``different_layout_per_head=True``.
            device: device of the layout's index tensors.
            segment_lengths, dilation_rates: defaults for the dilated pattern (a module's own).
        """
        from .patterns import get_pattern, intersection, make_layout, pattern_options

        fn = get_pattern(self.pattern_type)
        accepted = set(pattern_options(self.pattern_type))
        takes_any = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())

        def takes(option: str) -> bool:
            return takes_any or option in accepted

        field_to_option = {
            "sparsity_ratio": "density",
            "local_window_size": "window_size",
            "global_tokens": "global_tokens",
            "segment_lengths": "segment_lengths",
            "dilation_rates": "dilation_rates",
        }
        for name, option in field_to_option.items():
            if self.is_explicit(name) and not takes(option):
                raise ValueError(
                    f"SparsePatternConfig.{name} was set but pattern {self.pattern_type!r} does not take "
                    f"{option!r}; its options are {sorted(accepted)} (pass others through pattern_options)"
                )
        self._check_given(self.__dict__.get("_explicit", set()))  # also for pattern_options changed in place
        for name, own, passed in (("segment_lengths", self.segment_lengths, segment_lengths),
                                  ("dilation_rates", self.dilation_rates, dilation_rates)):
            if (own is None and passed is not None and name in self.pattern_options
                    and not _same_option(passed, self.pattern_options[name])):
                raise ValueError(
                    f"make_layout: {name}={list(passed)} (the module's) conflicts with "
                    f"SparsePatternConfig.pattern_options[{name!r}]={self.pattern_options[name]!r}; give it in one place"
                )
        opts: dict[str, Any] = {}
        segs = self.segment_lengths if self.segment_lengths is not None else segment_lengths
        rates = self.dilation_rates if self.dilation_rates is not None else dilation_rates
        if segs is not None and takes("segment_lengths"):
            opts["segment_lengths"] = list(segs)
        if rates is not None and takes("dilation_rates"):
            opts["dilation_rates"] = list(rates)
        if takes("global_tokens"):
            opts["global_tokens"] = self.global_tokens
        if takes("causal"):
            opts["causal"] = bool(causal)
        if takes("device") and device is not None:
            opts["device"] = device
        if (num_heads is not None and takes("num_heads") and "num_heads" not in self.pattern_options
                and self.pattern_options.get("different_layout_per_head")):
            opts["num_heads"] = num_heads
        opts.update(self.pattern_options)
        geometry = {"seq_len_q": seq_len_q, "seq_len_k": seq_len_k, "block_size": self.block_size}
        has_window, has_target = takes("window_size"), takes("density")
        use_window = has_window and (not has_target or not self.is_explicit("sparsity_ratio")
                                     or self.is_explicit("local_window_size"))
        use_target = has_target and (not has_window or self.is_explicit("sparsity_ratio"))
        if "density" in opts or "sparsity_ratio" in opts:
            use_target = False  # pattern_options sets the target itself
        if "window_size" in opts or "window" in opts:
            use_window = False
        window_opts = {"window_size": self.local_window_size} if use_window else {}
        num_key_blocks = -(-(seq_len_q if seq_len_k is None else seq_len_k) // self.block_size)
        # At least one block per query-block row: a lower target would leave queries with no key.
        target_opts = {"density": max(self.sparsity_ratio, 1.0 / num_key_blocks)} if use_target else {}
        if window_opts and target_opts:
            return intersection(
                make_layout(self.pattern_type, **geometry, **opts, **window_opts),
                make_layout(self.pattern_type, **geometry, **opts, **target_opts),
            )
        return make_layout(self.pattern_type, **geometry, **opts, **window_opts, **target_opts)


_LEVEL_KEYS = ("stride", "window_size", "block_size")


@_strict()
@dataclass
class HierarchicalConfig(_ValidatedConfig):
    """Levels of a hierarchical pattern (the guides' ``HierarchicalConfig``).

    Args:
        level_configs: list of dicts with keys ``stride`` (tokens between the positions that take
            part at this level), ``window_size`` (tokens each of them sees; ``-1`` = global) and
            ``block_size`` (the level's granularity in tokens). Default: three levels, fine to
            global.

    The layout is built by the ``hierarchical`` pattern of :mod:`dilated_sparse.patterns`. A
    layout has one block size (the module's, by default the finest level's); a level's
    ``block_size`` is its granularity: its windows' ends are rounded outward to multiples of it,
    so coarse levels see coarse, aligned spans. Assigning ``level_configs`` later validates it
    the same way.
    """

    level_configs: list[dict[str, int]] = field(default_factory=lambda: [
        {"stride": 64, "window_size": 256, "block_size": 64},
        {"stride": 256, "window_size": 1024, "block_size": 128},
        {"stride": 1024, "window_size": -1, "block_size": 256},
    ])

    def __post_init__(self) -> None:
        owner = "HierarchicalConfig"
        if isinstance(self.level_configs, dict) or not hasattr(self.level_configs, "__iter__"):
            raise TypeError(f"{owner}.level_configs must be a list of dicts, got {self.level_configs!r}")
        levels = [dict(level) for level in self.level_configs]
        if not levels:
            raise ValueError(f"{owner}.level_configs must hold at least one level")
        for i, level in enumerate(levels):
            keys = set(level)
            if keys != set(_LEVEL_KEYS):
                raise ValueError(
                    f"{owner}.level_configs[{i}] must have exactly the keys {list(_LEVEL_KEYS)}, "
                    f"got {sorted(keys)}"
                )
            _check_int(owner, f"level_configs[{i}]['stride']", level["stride"], minimum=1)
            _check_int(owner, f"level_configs[{i}]['window_size']", level["window_size"])
            if level["window_size"] == 0 or level["window_size"] < -1:
                raise ValueError(
                    f"{owner}.level_configs[{i}]['window_size'] must be positive or -1 (global), "
                    f"got {level['window_size']}"
                )
            _check_block(owner, f"level_configs[{i}]['block_size']", level["block_size"])
        self.level_configs = levels

    @property
    def num_levels(self) -> int:
        """Number of levels."""
        return len(self.level_configs)


@_strict()
@dataclass
class AdaptiveConfig(_ValidatedConfig):
    """Options of the learned layout of :class:`~dilated_sparse.modules.BlockSparseAdaptive`.

    Args:
        base_sparsity: fraction of key blocks each query-block row *skips*, in ``[0, 1)``
            (0.9 keeps the top 10 % of blocks of every row, at least one).
        temperature: initial temperature of the relaxed (Gumbel) top-k.
        learnable_temperature: learn a multiplicative correction of the temperature (a
            parameter ``log_temperature_scale``); the annealed schedule still applies.
        min_temperature: the temperature never goes below this.
        hidden_dim: hidden width of the importance network.
        num_layers: depth of the importance network's query and key towers (>= 1).
        share_across_heads: one layout for all heads (scores averaged over heads) instead of
            one per head.
        hard_sparsity: when True the selection is hard top-k with no straight-through gradient
            (the importance network gets no gradient from the task loss, only from
            ``get_sparsity_loss``); when False (default) a straight-through estimator lets the
            task loss train it.
        block_size: block edge in tokens (16, 32, 64, 128 or 256).
        gumbel_noise: add Gumbel noise to the scores in training mode (exploration).

    Fields set after construction (e.g. ``base_sparsity`` by a
    :class:`~dilated_sparse.modules.ProgressiveSparsityScheduler`) are validated the same way.
    """

    base_sparsity: float = 0.9
    temperature: float = 1.0
    learnable_temperature: bool = True
    min_temperature: float = 0.1
    hidden_dim: int = 128
    num_layers: int = 2
    share_across_heads: bool = False
    hard_sparsity: bool = False
    block_size: int = 64
    gumbel_noise: bool = True

    def __post_init__(self) -> None:
        owner = "AdaptiveConfig"
        if (isinstance(self.base_sparsity, bool) or not isinstance(self.base_sparsity, (int, float))
                or not 0.0 <= self.base_sparsity < 1.0):
            raise ValueError(f"{owner}.base_sparsity must lie in [0, 1), got {self.base_sparsity!r}")
        for name in ("temperature", "min_temperature"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
                    or not math.isfinite(value)):
                raise ValueError(f"{owner}.{name} must be a positive finite float, got {value!r}")
        if self.min_temperature > self.temperature:
            raise ValueError(
                f"{owner}: min_temperature {self.min_temperature} > temperature {self.temperature}"
            )
        _check_int(owner, "hidden_dim", self.hidden_dim, minimum=1)
        _check_int(owner, "num_layers", self.num_layers, minimum=1)
        for name in ("learnable_temperature", "share_across_heads", "hard_sparsity", "gumbel_noise"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{owner}.{name} must be a bool, got {getattr(self, name)!r}")
        _check_block(owner, "block_size", self.block_size)


def __getattr__(name: str) -> Any:
    """Lazily re-export ``DistributedSparseConfig`` from :mod:`dilated_sparse.distributed.config`."""
    if name == "DistributedSparseConfig":
        try:
            from .distributed.config import DistributedSparseConfig
        except ImportError as error:
            raise ImportError(
                "DistributedSparseConfig lives in dilated_sparse.distributed.config, which could "
                f"not be imported: {error}"
            ) from error
        return DistributedSparseConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
