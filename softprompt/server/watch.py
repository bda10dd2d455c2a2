"""``softprompt serve --watch DIR``: serve the soft prompts in a directory as it changes.

A background task of the app (started by its lifespan) polls DIR every ``interval`` seconds,
once the model is ready. The prompts are those ``--prompt-dir`` registers (every PEFT adapter
subdirectory and ``.safetensors`` / ``.npy`` file, named after it), and each one's signature is
the (mtime, size) of its files (for an adapter: ``adapter_config.json`` and
``adapter_model.safetensors``). A new or changed signature is acted on once it has stayed the
same for one more poll (a file still being written is not read), then:

- the prompt is loaded and validated like any other (``SoftPrompt.load``: bounded headers, no
  pickle); a prompt whose content equals the served one (same digest) is left alone;
- ``Runtime.add_prompt`` swaps it in: its prefix is computed first, then the name changes
  atomically; requests accepted before keep the old version;
- a prompt that fails is logged and keeps being served as it was; it is tried again when its
  files change;
- a prompt whose entry disappears from DIR is removed (only prompts this watcher saw in DIR).

Polling mtimes needs no dependency and works on every filesystem (network mounts included).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

from starlette.concurrency import run_in_threadpool

from softprompt.runtime.prompts import SoftPrompt, SoftPromptError

from .app import prompt_dir_sources
from .state import ServerState

log = logging.getLogger("uvicorn.error")

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def signature(source: Path) -> tuple | None:
    """(mtime_ns, size) of a prompt's files, or None while one is missing."""
    files = [source / f for f in ADAPTER_FILES] if source.is_dir() else [source]
    try:
        return tuple((s.st_mtime_ns, s.st_size) for s in (os.stat(f) for f in files))
    except OSError:
        return None


class PromptWatcher:
    """Keeps the runtime's prompts in step with ``directory`` (see the module docstring).

    ``poll()`` does one scan (blocking: run it in a thread); ``run()`` polls forever."""

    def __init__(self, st: ServerState, directory, interval: float = 2.0):
        if interval <= 0:
            raise ValueError(f"the watch interval must be > 0 seconds, got {interval}")
        self.st, self.dir, self.interval = st, Path(directory), interval
        self.applied: dict[str, tuple] = {}  # name -> signature acted on
        self.pending: dict[str, tuple] = {}  # name -> signature seen once, not yet acted on
        self._missing_logged = False

    def poll(self) -> list[str]:
        """One scan; returns what it did (``added NAME``, ``replaced NAME``, ``removed NAME``,
        ``failed NAME``)."""
        rt, done = self.st.rt, []
        try:
            entries = dict(prompt_dir_sources(self.dir))
            self._missing_logged = False
        except SoftPromptError:
            if not self._missing_logged:
                log.warning("softprompt: --watch %s is not a directory (yet); still watching", self.dir)
                self._missing_logged = True
            entries = {}
        for name, source in entries.items():
            sig = signature(source)
            if sig is None or self.applied.get(name) == sig:
                self.pending.pop(name, None)
                continue
            if self.pending.get(name) != sig:  # new or still changing: look again next poll
                self.pending[name] = sig
                continue
            del self.pending[name]
            self.applied[name] = sig
            try:
                sp = SoftPrompt.load(source, name=name)
                current = rt.prompts.get(name)
                if current is not None and current.digest == sp.digest:
                    continue
                rt.add_prompt(name, sp)
            except (SoftPromptError, ValueError, RuntimeError) as e:
                log.warning("softprompt: --watch: prompt %r from %s not loaded: %s", name, source, e)
                done.append(f"failed {name}")
                continue
            self.st.created[name] = int(time.time())
            what = "replaced" if current is not None else "added"
            log.info("softprompt: --watch: prompt %r %s from %s (P=%d)", name, what, source,
                     sp.num_virtual_tokens)
            done.append(f"{what} {name}")
        for name in [n for n in self.applied if n not in entries]:
            del self.applied[name]
            if name in rt.prompts:
                try:
                    rt.remove_prompt(name)
                except KeyError:
                    continue
                self.st.created.pop(name, None)
                log.info("softprompt: --watch: prompt %r removed (gone from %s)", name, self.dir)
                done.append(f"removed {name}")
        return done

    async def run(self) -> None:
        """Poll every ``interval`` seconds once the runtime is ready, until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            if not self.st.ready:
                continue
            try:
                await run_in_threadpool(self.poll)
            except Exception as e:  # noqa: BLE001 - the watcher must outlive one bad scan
                log.error("softprompt: --watch: scan of %s failed: %s: %s", self.dir,
                          type(e).__name__, e)
