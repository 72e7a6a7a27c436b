"""Remembering, per machine, whether llama.cpp's extra buffer types may be used.

Those buffer types (weight repacking, AMX tiles) select CPU-specific kernels; on some virtual
machines the AMX ones fault although the kernel grants AMX, and nothing short of running them
tells. The first start probes; the outcome is written to the data directory, keyed by what the
CPU reports and the llama-cpp-python version, so later starts do not crash first and a data
directory copied to another machine probes again.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import platform
from pathlib import Path

__all__ = ["ExtraBuffersMemory", "machine_key"]

logger = logging.getLogger(__name__)


def machine_key() -> str:
    """A short hash of the CPU's model and flags and the llama-cpp-python version."""
    parts = [platform.machine(), platform.processor()]
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        cpuinfo = ""
    for line in cpuinfo.splitlines():
        if line.startswith(("model name", "flags", "Features", "CPU part")):
            parts.append(line)
        if not line.strip() and len(parts) > 2:
            break  # the first CPU's block is enough
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        parts.append(importlib.metadata.version("llama-cpp-python"))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


class ExtraBuffersMemory:
    """The decision for this machine, in ``<data dir>/local-model.json``."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "local-model.json"
        self._key = machine_key()

    def _read(self) -> dict[str, object]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def recall(self) -> bool | None:
        entry = self._read().get(self._key)
        if isinstance(entry, dict) and isinstance(entry.get("extra_buffers"), bool):
            return bool(entry["extra_buffers"])
        return None

    def remember(self, extra_buffers: bool) -> None:
        data = self._read()
        data[self._key] = {"extra_buffers": extra_buffers}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=2) + "\n")
            tmp.replace(self.path)
        except OSError as exc:  # not fatal: the next start probes again
            logger.warning(
                "could not remember the local model's CPU decision in %s: %s",
                self.path,
                exc.strerror,
            )
