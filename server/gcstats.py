"""Garbage collection in a long-lived server: pause measurements (gc.callbacks) and periodic
freezing, because full collections over thousands of streams stall the event loop."""

from __future__ import annotations

import asyncio
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


class GcFreezer:
    """Keeps collections short in a process holding thousands of long-lived streams.

    Automatic full collections are turned off (measured at 10,000 agents: about 0.7 s each, dozens
    of them during a fleet-wide request). Every `freeze_every` seconds, gc.freeze() moves every
    object alive into the permanent generation (an O(1) list splice), so young collections stay
    small. Objects that die after being frozen are still freed by reference counting; only
    reference cycles wait for the next thaw: every `thaw_every` seconds the permanent generation
    is returned and collected once (one longer pause), then frozen again.
    """

    THRESHOLDS = (5_000, 20, 1_000_000_000)  # gen0 allocations, gen1 and (never) gen2 triggers

    def __init__(self, freeze_every: float = 10.0, thaw_every: float = 600.0) -> None:
        self.freeze_every = freeze_every
        self.thaw_every = thaw_every
        self.freezes = 0
        self.thaws = 0

    async def run(self) -> None:
        defaults = gc.get_threshold()
        gc.set_threshold(*self.THRESHOLDS)
        try:
            await self._run()
        finally:
            gc.set_threshold(*defaults)

    async def _run(self) -> None:
        gc.freeze()
        last_thaw = time.monotonic()
        while True:
            await asyncio.sleep(self.freeze_every)
            if time.monotonic() - last_thaw >= self.thaw_every:
                gc.unfreeze()
                gc.collect()
                self.thaws += 1
                last_thaw = time.monotonic()
            gc.freeze()
            self.freezes += 1
