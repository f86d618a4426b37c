"""Training helpers: temperature annealing of adaptive modules, progressive sparsity."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

__all__ = ["AdaptiveSparsityTrainer", "ProgressiveSparsityScheduler"]


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class _StepSchedule:
    """A step counter whose scheduled value is applied to the modules at every change."""

    current_step: int

    def _apply(self) -> None:
        raise NotImplementedError

    def _value(self) -> float:
        raise NotImplementedError

    def step(self) -> float:
        """Advance one step and apply the new scheduled value to the modules; returns it."""
        self.current_step += 1
        self._apply()
        return self._value()

    def state_dict(self) -> dict[str, Any]:
        """The step counter (to resume)."""
        return {"current_step": self.current_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`."""
        self.current_step = int(state["current_step"])
        self._apply()


class AdaptiveSparsityTrainer(_StepSchedule):
    """Anneals the temperature of every :class:`~dilated_sparse.modules.BlockSparseAdaptive` in a model.

    Args:
        model: a ``BlockSparseAdaptive`` or any module containing some.
        initial_temperature, final_temperature: the schedule's ends (positive).
        annealing_steps: steps from initial to final (the temperature stays final afterwards).
        schedule: ``'exponential'`` (geometric, default), ``'linear'`` or ``'cosine'``.

    Call :meth:`step` once per optimiser step. The module's effective temperature is this value
    times its learnable scale, floored at ``AdaptiveConfig.min_temperature``.
    """

    def __init__(
        self,
        model: nn.Module,
        initial_temperature: float = 1.0,
        final_temperature: float = 0.1,
        annealing_steps: int = 10000,
        schedule: str = "exponential",
    ) -> None:
        from .adaptive import BlockSparseAdaptive

        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.modules = [m for m in model.modules() if isinstance(m, BlockSparseAdaptive)]
        if not self.modules:
            raise ValueError("model contains no BlockSparseAdaptive module to anneal")
        for name, value in (("initial_temperature", initial_temperature), ("final_temperature", final_temperature)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive float, got {value!r}")
        if schedule not in ("exponential", "linear", "cosine"):
            raise ValueError(f"schedule must be 'exponential', 'linear' or 'cosine', got {schedule!r}")
        self.initial_temperature = float(initial_temperature)
        self.final_temperature = float(final_temperature)
        self.annealing_steps = _check_positive_int("annealing_steps", annealing_steps)
        self.schedule = schedule
        self.current_step = 0
        self._apply()

    def temperature_at(self, step: int) -> float:
        """The scheduled temperature after ``step`` steps."""
        t = min(max(step, 0) / self.annealing_steps, 1.0)
        a, b = self.initial_temperature, self.final_temperature
        if self.schedule == "exponential":
            return a * (b / a) ** t
        if self.schedule == "linear":
            return a + (b - a) * t
        return b + (a - b) * 0.5 * (1.0 + math.cos(math.pi * t))

    @property
    def temperature(self) -> float:
        """The current scheduled temperature."""
        return self.temperature_at(self.current_step)

    def _apply(self) -> None:
        value = self.temperature
        for module in self.modules:
            module.temperature.fill_(value)

    def _value(self) -> float:
        return self.temperature


class ProgressiveSparsityScheduler(_StepSchedule):
    """Moves the sparsity of a model's block-sparse modules from ``initial`` to ``final``.

    Sparsity is the fraction of blocks *skipped*. Modules with a ``sparse_config``
    (:class:`~dilated_sparse.modules.BlockSparseRingDilatedAttention`,
    :class:`~dilated_sparse.modules.BlockSparseMultiheadAttention` with a pattern config) get
    ``sparse_config.sparsity_ratio = 1 - sparsity`` (the fraction computed), which changes the
    layout from the next call (their layout cache is keyed by the config);
    :class:`~dilated_sparse.modules.BlockSparseAdaptive` modules get
    ``adaptive_config.base_sparsity = sparsity``. The initial sparsity is applied at once.

    Args:
        model: a module or a model containing such modules.
        initial_sparsity, final_sparsity: in ``[0, 1)``.
        total_steps: steps of the linear ramp.

    Raises:
        ValueError: no such module, or a module's pattern takes no target density (e.g.
            ``'all'``), so its layout could not follow the schedule.
    """

    def __init__(
        self,
        model: nn.Module,
        initial_sparsity: float = 0.5,
        final_sparsity: float = 0.95,
        total_steps: int = 10000,
    ) -> None:
        from ..patterns import pattern_options
        from .adaptive import BlockSparseAdaptive

        for name, value in (("initial_sparsity", initial_sparsity), ("final_sparsity", final_sparsity)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {value!r}")
        self.initial_sparsity, self.final_sparsity = float(initial_sparsity), float(final_sparsity)
        self.total_steps = _check_positive_int("total_steps", total_steps)
        self.model = model
        self.configs = []
        self.adaptive = []
        for module in model.modules():
            if isinstance(module, BlockSparseAdaptive):
                self.adaptive.append(module)
                continue
            config = getattr(module, "sparse_config", None)
            if config is None:
                continue
            if "density" not in pattern_options(config.pattern_type):
                raise ValueError(
                    f"{type(module).__name__} uses pattern {config.pattern_type!r}, which takes no target density; "
                    "ProgressiveSparsityScheduler needs patterns such as 'dilated_sparse', 'local_window', "
                    "'global_local' or 'random'"
                )
            self.configs.append(config)
        if not self.configs and not self.adaptive:
            raise ValueError("model contains no block-sparse module with a sparse_config or adaptive_config")
        self.current_step = 0
        self._apply()

    def sparsity_at(self, step: int) -> float:
        """The scheduled sparsity after ``step`` steps."""
        t = min(max(step, 0) / self.total_steps, 1.0)
        return self.initial_sparsity + (self.final_sparsity - self.initial_sparsity) * t

    @property
    def current_sparsity(self) -> float:
        """The sparsity now applied."""
        return self.sparsity_at(self.current_step)

    def _apply(self) -> None:
        sparsity = self.current_sparsity
        for config in self.configs:
            config.sparsity_ratio = max(1.0 - sparsity, 1e-6)
        for module in self.adaptive:
            module.config.base_sparsity = sparsity

    def _value(self) -> float:
        return self.current_sparsity
