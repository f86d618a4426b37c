"""``dilated-sparse info``: versions, extension build, devices and optional extras."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
from typing import Any

__all__ = ["add_parser", "collect_info", "run"]

_EXTRAS = ("numpy", "matplotlib", "tqdm", "transformers", "lightning", "pytorch_lightning", "triton")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register the ``info`` subcommand."""
    parser = sub.add_parser(
        "info", help="versions, extension build and devices",
        description="Print versions (package, torch, CUDA), how the extension was loaded "
        "(wheel / jit / none), its compiled architectures and head dims, and the devices seen.",
        allow_abbrev=False,
    )
    parser.add_argument("--json", action="store_true", help="print the same facts as JSON")
    return parser


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _extension_facts() -> dict[str, Any]:
    import dilated_sparse as ds

    from .. import ops

    facts: dict[str, Any] = {"available": ds.extension_available(), "mode": "none"}
    if not facts["available"]:
        error = getattr(ops, "_LOAD_ERROR", None)
        facts["error"] = f"{type(error).__name__}: {error}" if error is not None else "unknown"
        return facts
    try:
        from .._extension import extension_info

        details = dict(extension_info())
    except Exception as error:  # noqa: BLE001 - the build may predate extension_info
        details = {"info_error": f"{type(error).__name__}: {error}"}
    facts.update(details)
    return facts


def _devices() -> list[dict[str, Any]]:
    import torch

    devices: list[dict[str, Any]] = [{
        "device": "cpu",
        "name": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
    }]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            devices.append({
                "device": f"cuda:{index}",
                "name": props.name,
                "capability": f"sm_{props.major}{props.minor}",
                "memory_gib": round(props.total_memory / 2**30, 1),
            })
    return devices


def collect_info() -> dict[str, Any]:
    """Everything ``info`` prints, as a JSON-serialisable dict."""
    import torch

    import dilated_sparse as ds

    try:
        from ..patterns import available_patterns

        patterns: list[str] | str = available_patterns()
    except Exception as error:  # noqa: BLE001 - reported, not fatal
        patterns = f"unavailable ({type(error).__name__}: {error})"
    return {
        "dilated_sparse": ds.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "extension": _extension_facts(),
        "devices": _devices(),
        "patterns": patterns,
        "optional": {name: _dist_version(name) for name in _EXTRAS},
    }


def _format(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) if value else "-"
    return "-" if value is None else str(value)


def run(args: argparse.Namespace, extra: list[str]) -> int:
    """Print the facts (text or JSON); always status 0."""
    facts = collect_info()
    if args.json:
        print(json.dumps(facts, indent=2, default=str))
        return 0
    ext = facts["extension"]
    lines = [
        f"dilated_sparse   {facts['dilated_sparse']}",
        f"python           {facts['python']} ({facts['platform']})",
        (f"torch            {facts['torch']} (CUDA {_format(facts['torch_cuda'])}, "
        f"cuda available: {facts['cuda_available']})"),
        f"extension        {ext.get('mode', 'none') if ext['available'] else 'none (not loaded)'}",
    ]
    if ext["available"]:
        for key, value in ext.items():
            if key not in ("available", "mode"):
                lines.append(f"  {key:<15}{_format(value)}")
    else:
        lines.append(f"  error          {ext.get('error')}")
    lines.append("devices")
    for dev in facts["devices"]:
        details = ", ".join(f"{k}={v}" for k, v in dev.items() if k not in ("device", "name"))
        lines.append(f"  {dev['device']:<15}{dev['name']} ({details})")
    lines.append(f"patterns         {_format(facts['patterns'])}")
    lines.append("optional         " + ", ".join(
        f"{name} {version or '(not installed)'}" for name, version in facts["optional"].items()
    ))
    print("\n".join(lines))
    return 0
