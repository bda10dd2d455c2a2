"""Hugging Face Hub ids for models and soft-prompt adapters, resolved through ``huggingface_hub``.

    resolve("HuggingFaceTB/SmolLM2-135M-Instruct")        # -> the cached snapshot directory
    resolve("someone/my-prompt-tuning-adapter@v1", kind="adapter")
    resolve("someone/models/model.Q4_K_M.gguf")           # one file of a repository

An id is ``owner/name``, optionally followed by ``/file.gguf`` and by ``@revision`` (branch,
tag or commit); legacy one-word names (``gpt2``) are spelled with their owner
(``openai-community/gpt2``), so a missing local directory is never mistaken for a hub id.
Everything else is ``huggingface_hub``'s: its cache (``HF_HOME`` / ``HF_HUB_CACHE``),
``HF_HUB_OFFLINE``, and the token from ``HF_TOKEN`` or ``hf auth login``. The environment is
read at call time, so ``os.environ["HF_HUB_OFFLINE"] = "1"`` set after ``huggingface_hub`` was
imported still holds.
A local path always wins over a hub id of the same spelling (callers check it first).

Only the files the runtime reads are fetched: configs, safetensors weights and tokenizer
files for a model; ``adapter_config.json`` + ``adapter_model.safetensors`` for an adapter
(pickled weights never, unless the caller allows pickle).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "tokenizer*"]
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]

# owner/name[/file.gguf][@revision]; names as the Hub allows them (letters, digits, - _ .).
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)"
                     r"(?:/(?P<file>[\w.-]+\.gguf))?(?:@(?P<revision>[\w./-]+))?")
_FILE_SUFFIXES = (".gguf", ".safetensors", ".npy", ".bin", ".pt", ".pth", ".json", ".jsonl")
_TRUE = ("1", "on", "yes", "true")


class HubError(ValueError):
    """A hub id that cannot be resolved; the message names the id and what to do."""


def parse(source: str) -> tuple[str, str | None, str | None] | None:
    """``(repo_id, filename or None, revision or None)`` if ``source`` is spelled like a hub
    id, else None (``x``, ``./x``, ``/x``, ``~/x``, ``a/b/c``, ``a/b.npy`` are never hub ids)."""
    m = _HUB_ID.fullmatch(str(source))
    if m is None or ".." in m["repo"] or "--" in m["repo"] or m["repo"].endswith(_FILE_SUFFIXES):
        return None
    return m["repo"], m["file"], m["revision"]


def is_hub_id(source) -> bool:
    """True for a string that is not an existing local path and is spelled like a hub id."""
    return isinstance(source, str) and not Path(source).expanduser().exists() \
        and parse(source) is not None


def offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as set now, not at import time."""
    import huggingface_hub.constants as c

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return env.strip().lower() in _TRUE if env is not None else bool(c.HF_HUB_OFFLINE)


def cache_dir() -> Path:
    """The hub cache as the environment says now: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``,
    else huggingface_hub's default."""
    import huggingface_hub.constants as c

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(c.HF_HUB_CACHE)


def resolve(source: str, *, kind: str = "model", revision: str | None = None,
            allow_patterns: list[str] | None = None, error: type[Exception] = HubError) -> Path:
    """The local path of hub id ``source``: its snapshot directory, or the file for
    ``owner/name/file.gguf``; downloaded into the hub cache unless already there.

    Args:
        source: ``owner/name[/file.gguf][@revision]``.
        kind: ``"model"`` or ``"adapter"``; picks the files fetched and words the errors.
        revision: branch, tag or commit; conflicts with an ``@revision`` in ``source``.
        allow_patterns: files to fetch instead of the kind's default list.
        error: the exception class raised (``ModelError``, ``SoftPromptError``...).

    Raises:
        ``error`` with one line: offline and not cached (with the command that fetches it),
        no such repository/revision/file, gated or private without a token, no
        huggingface_hub installed.
    """
    parsed = parse(source)
    if parsed is None:
        raise error(f"{source!r} is neither a local path nor a Hugging Face hub id "
                    "(owner/name[@revision])")
    repo, filename, rev = parsed
    if rev and revision and rev != revision:
        raise error(f"{source!r} names revision {rev!r} but revision={revision!r} was passed")
    revision = rev or revision
    try:
        import huggingface_hub
        from huggingface_hub import errors as hub_errors
    except ImportError:
        raise error(f"{source!r} is not a local path; loading it from the Hugging Face hub "
                    "needs `pip install huggingface_hub`") from None
    local_only = offline()
    what = f"{'soft prompt adapter' if kind == 'adapter' else kind} {source!r}"
    fetch = f"`hf download {repo}{' ' + filename if filename else ''}" \
            f"{' --revision ' + revision if revision else ''}`"
    kw = dict(revision=revision, cache_dir=cache_dir(), local_files_only=local_only)
    try:
        if filename:
            return Path(huggingface_hub.hf_hub_download(repo, filename, **kw))
        patterns = allow_patterns or (ADAPTER_FILES if kind == "adapter" else MODEL_FILES)
        return Path(huggingface_hub.snapshot_download(repo, allow_patterns=patterns, **kw))
    except hub_errors.IncompleteSnapshotError:
        raise error(f"{what} is only partly in the Hugging Face cache ({kw['cache_dir']}); "
                    f"complete it with {fetch} on a machine online") from None
    except hub_errors.LocalEntryNotFoundError:
        if local_only:
            raise error(f"{what} is not a local path and not in the Hugging Face cache "
                        f"({kw['cache_dir']}), and HF_HUB_OFFLINE forbids downloading it; fetch "
                        f"it first with {fetch} on a machine online, or unset HF_HUB_OFFLINE") \
                from None
        raise error(f"{what} is not a local path, not in the Hugging Face cache "
                    f"({kw['cache_dir']}), and the hub cannot be reached; fetch it with {fetch} "
                    "when online") from None
    except hub_errors.GatedRepoError:
        raise error(f"{what} is gated on the Hugging Face hub: accept its terms on the "
                    "model page and log in with `hf auth login` (or set HF_TOKEN)") from None
    except hub_errors.RepositoryNotFoundError:
        raise error(f"{what} is not a local path and the Hugging Face hub has no such "
                    "repository (or it is private: log in with `hf auth login` or set "
                    "HF_TOKEN)") from None
    except hub_errors.RevisionNotFoundError:
        raise error(f"{what}: the Hugging Face hub repository {repo!r} has no revision "
                    f"{revision!r}") from None
    except hub_errors.EntryNotFoundError:
        raise error(f"{what}: the Hugging Face hub repository {repo!r} has no file "
                    f"{filename!r}") from None
    except hub_errors.HFValidationError as e:
        raise error(f"{source!r} is neither a local path nor a valid hub id "
                    f"({str(e).splitlines()[0]})") from None
    except hub_errors.HfHubHTTPError as e:
        raise error(f"{what}: the Hugging Face hub answered "
                    f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
