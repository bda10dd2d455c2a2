"""The prompt registry: names -> prompt versions (any kind), and which versions requests still hold.

A change is atomic: the new prompt's prefix is computed first (``prepare``) and only then does
the name point at it, so a failure leaves the registry as it was. A request is bound to the
prompt version current when it was accepted (``hold``) until it ends (``release``); a version
that no name and no request uses any more has its cached prefix dropped (``forget``).
``prepare`` and ``forget`` are the backend's, run on the engine thread by the caller's wiring.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from types import MappingProxyType

from .prompts import Prompt
from .requests import Row


class PromptRegistry:
    """Registered prompts by name (read them through ``prompts``, a live read-only view)."""

    def __init__(self, prepare: Callable[[Prompt], None],
                 forget: Callable[[Prompt], None]):
        self._prepare = prepare
        self._forget = forget
        self._prompts: dict[str, Prompt] = {}
        self.prompts: Mapping[str, Prompt] = MappingProxyType(self._prompts)
        self._changes = threading.Lock()  # one change at a time
        self._held: Counter[str] = Counter()  # prompt digest -> accepted requests not finished
        self._held_lock = threading.Lock()

    def add(self, name: str, sp: Prompt) -> Prompt:
        """Register ``sp`` as ``name`` (replacing any old version); returns the registered copy."""
        if sp.name != name:
            sp = replace(sp, name=name)  # type: ignore[type-var]
        with self._changes:
            self._prepare(sp)  # the new prefix first: if it fails, nothing has changed
            old = self._prompts.get(name)
            self._prompts[name] = sp
            if old is not None:
                self._forget_if_unused(old)
        return sp

    def remove(self, name: str) -> None:
        """Unregister ``name``; its prefix goes once no accepted request needs it."""
        with self._changes:
            sp = self._prompts.pop(name, None)
            if sp is None:
                raise KeyError(f"unknown prompt {name!r}; known: {sorted(self._prompts)}")
            self._forget_if_unused(sp)

    def _in_use(self, digest: str) -> bool:
        return bool(self._held[digest]) or any(p.digest == digest
                                               for p in list(self._prompts.values()))

    def _forget_if_unused(self, sp: Prompt) -> None:
        with self._held_lock:
            if self._in_use(sp.digest):
                return
        self._forget(sp)

    def hold(self, rows: Iterable[Row | None]) -> None:
        """Bind accepted rows to their prompt versions (until ``release``)."""
        with self._held_lock:
            self._held.update(r.prompt.digest for r in rows
                              if r is not None and r.prompt and not r.inline)

    def release(self, rows: Iterable[Row | None]) -> None:
        """The rows ended: drop prompt versions that nothing uses any more. Called on the
        engine thread (result delivery), so it never waits for a change in progress."""
        drop: dict[str, Prompt] = {}
        with self._held_lock:
            for r in rows:
                if r is None or r.prompt is None or r.inline:
                    continue  # an inline prompt's prefix stays cached (LRU) for its next use
                d = r.prompt.digest
                self._held[d] -= 1
                if self._held[d] <= 0:
                    del self._held[d]
                    if not self._in_use(d):
                        drop[d] = r.prompt
        for sp in drop.values():
            self._forget(sp)
