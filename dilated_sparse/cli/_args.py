"""Argument parsing shared by the subcommands: value types and the one-line error rule.

Every bad option ends the command with one line on stderr naming the option
(``dilated-sparse show: error: argument --seq-len: must be a positive integer, got '-5'``) and
exit status 2, never a traceback. Type functions raise ``argparse.ArgumentTypeError``; checks
that need more than one option raise :class:`CliError`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import torch

__all__ = [
    "CLI_HIDDEN_OPTIONS",
    "DTYPES",
    "ArgumentParser",
    "CliError",
    "block_size",
    "device_name",
    "dtype_name",
    "non_negative_int",
    "parse_pattern_options",
    "parse_value",
    "positive_float",
    "positive_int",
]

#: Accepted ``--dtype`` spellings -> torch dtype.
DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}


#: Pattern options the command line does not offer (set by the command itself).
CLI_HIDDEN_OPTIONS: frozenset[str] = frozenset({"device"})


class CliError(Exception):
    """A bad option or option combination: one line naming ``option``, exit status 2."""

    def __init__(self, option: str | None, message: str) -> None:
        super().__init__(message)
        self.option = option
        self.message = message

    def __str__(self) -> str:
        return f"argument {self.option}: {self.message}" if self.option else self.message


def one_line(text: str) -> str:
    """``text`` folded onto a single line (argparse messages may hold newlines)."""
    return " ".join(str(text).split())


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line (no usage dump) and exit 2."""

    def error(self, message: str) -> NoReturn:
        """Print ``prog: error: message`` on one line and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


# ------------------------------------------------------------------------ value types
def positive_int(text: str) -> int:
    """An integer ``> 0``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """An integer ``>= 0``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite float ``> 0``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def dtype_name(text: str) -> str:
    """A dtype spelling from :data:`DTYPES`, returned as the canonical name (``float16``...)."""
    dtype = DTYPES.get(text.strip().lower())
    if dtype is None:
        raise argparse.ArgumentTypeError(
            f"unknown dtype {text!r}; choose float16, bfloat16, float32 or float64"
        )
    return str(dtype).removeprefix("torch.")


def device_name(text: str) -> str:
    """``cpu`` or ``cuda`` / ``cuda:N``."""
    value = text.strip().lower()
    if value == "cpu" or value == "cuda" or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise argparse.ArgumentTypeError(f"unknown device {text!r}; choose cpu or cuda (cuda:N)")


def block_size(text: str) -> tuple[int, int]:
    """``64`` or ``64x32`` / ``64,32`` -> ``(block_q, block_k)``, each a supported size."""
    from ..layout import SUPPORTED_BLOCK_SIZES

    parts = text.replace("x", ",").replace("X", ",").split(",")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int or BQxBK, got {text!r}") from None
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or any(s not in SUPPORTED_BLOCK_SIZES for s in sizes):
        choices = ", ".join(map(str, SUPPORTED_BLOCK_SIZES))
        raise argparse.ArgumentTypeError(f"each block size must be one of {choices}, got {text!r}")
    return sizes[0], sizes[1]


def parse_value(text: str) -> Any:
    """A pattern option value: JSON for lists/objects (``[...]``, ``{...}``), bool, None, int,
    float, comma list of those, else the string."""
    stripped = text.strip()
    if stripped[:1] in ("[", "{"):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError as error:
            raise CliError(None, f"bad JSON value {text!r}: {error}") from None
    low = stripped.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low == "none":
        return None
    if "," in text:
        return [parse_value(part) for part in text.split(",") if part.strip()]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _looks_like_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_pattern_options(
    pattern: str, tokens: Sequence[str], *, where: str = ""
) -> dict[str, Any]:
    """Turn leftover ``--name value`` / ``--name=value`` / ``--flag`` / ``--no-flag`` tokens into
    the options of ``pattern``, checked against the registry's option names.

    Raises:
        CliError: a stray token, or an option the pattern does not take (the message lists its
            options).
    """
    from ..patterns import pattern_options

    valid = [name for name in pattern_options(pattern) if name not in CLI_HIDDEN_OPTIONS]
    options: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or token == "--":
            raise CliError(None, f"unrecognized argument {token!r}{where}")
        name, eq, value_text = token[2:].partition("=")
        key = name.replace("-", "_")
        negated = False
        if key not in valid and key.startswith("no_") and key[3:] in valid and not eq:
            key, negated = key[3:], True
        if key not in valid:
            listed = ", ".join("--" + v.replace("_", "-") for v in valid) or "none"
            raise CliError(f"--{name}", f"is not an option of pattern {pattern!r}{where}; its options: {listed}")
        try:
            if negated:
                value: Any = False
            elif eq:
                value = parse_value(value_text)
            elif i + 1 < len(tokens) and (not tokens[i + 1].startswith("-") or _looks_like_number(tokens[i + 1])):
                i += 1
                value = parse_value(tokens[i])
            else:
                value = True
        except CliError as error:
            raise CliError(f"--{name}", error.message) from None
        options[key] = value
        i += 1
    return options


def fail(option: str | None, message: str) -> NoReturn:
    """Raise :class:`CliError` (for call sites that read better as a statement)."""
    raise CliError(option, message)


def stderr_line(prog: str, message: str) -> None:
    """Print ``prog: error: message`` on one line to stderr."""
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
