"""Garbage-collector pauses, measured with gc.callbacks (full collections stall the event loop)."""

from __future__ import annotations

import gc
import time
from typing import Any


class GcPauses:
    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.max_pause_ms = [0.0, 0.0, 0.0]
        self.total_pause_ms = 0.0
        self._started = 0.0

    def install(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = (time.perf_counter() - self._started) * 1000
        generation = info["generation"]
        self.collections[generation] += 1
        self.max_pause_ms[generation] = max(self.max_pause_ms[generation], pause)
        self.total_pause_ms += pause

    def snapshot(self) -> dict[str, float]:
        return {
            "gc_full_collections": self.collections[2],
            "gc_max_full_pause_ms": round(self.max_pause_ms[2], 2),
            "gc_max_young_pause_ms": round(max(self.max_pause_ms[:2]), 2),
            "gc_total_pause_ms": round(self.total_pause_ms, 1),
        }
