"""Chat: a conversation turned into the token ids the model sees, through the model's own chat
template (torch-free: jinja2 and the ``tokenizers`` wrapper only).

    ids = chat_ids(rt.tokenizer, [{"role": "user", "content": "Hi"}])   # what rt.chat runs

This is what transformers' ``tokenizer.apply_chat_template(messages, add_generation_prompt=True,
tokenize=True)`` does, without transformers: the template (``chat_template.jinja`` beside the
tokenizer, else ``chat_template`` in ``tokenizer_config.json``) is rendered in jinja2's
immutable sandbox with ``trim_blocks`` and ``lstrip_blocks``, the ``raise_exception`` and
``strftime_now`` globals, a ``tojson`` that does not escape HTML, and the tokenizer's named
special tokens (``bos_token``, ``eos_token``, ...) as variables; the text is then tokenised
without adding special tokens again (the template writes them). Under a soft prompt the model
sees ``[v_1..v_P, templated ids]``: the virtual tokens first, exactly where PEFT puts them.

Messages: ``{"role": "system" | "user" | "assistant", "content": str | [{"type": "text",
"text": str}, ...], "name": str (optional)}``; text parts are joined with newlines (as vLLM does
for templates that take string content); keys whose value is None are dropped first (as
transformers does). Anything else is a one-line ``RequestError``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from softprompt.models import loads_json

from .requests import RequestError

if TYPE_CHECKING:
    from .requests import Tokenizer

CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = ("role", "content", "name")
# the named special tokens transformers passes to a template (``special_tokens_map``)
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                  "mask_token")


@dataclass(frozen=True)
class ChatTemplate:
    """A model's chat template: the jinja ``source`` and the special tokens it may use
    (``special_tokens``: (name, text) pairs such as ``("bos_token", "<s>")``)."""

    source: str
    special_tokens: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_tokenizer(cls, tok: Any) -> ChatTemplate | None:
        """The template of a transformers tokenizer (its ``chat_template``; of several named
        ones, ``default``), or None when it has none."""
        source = _default_template(getattr(tok, "chat_template", None))
        if source is None:
            return None
        special = getattr(tok, "special_tokens_map", None) or {}
        return cls(source, tuple((k, str(v)) for k, v in special.items()
                                 if k in SPECIAL_TOKENS and v is not None))

    @classmethod
    def from_dir(cls, path: str | Path) -> ChatTemplate | None:
        """The template saved beside a tokenizer (a model directory, an exported bundle):
        ``chat_template.jinja``, else ``chat_template`` in ``tokenizer_config.json`` (a string,
        or a list of ``{"name", "template"}`` of which ``default``); None when there is none."""
        root = Path(path)
        conf: dict = {}
        cfg = root / TOKENIZER_CONFIG
        if cfg.is_file():
            try:
                loaded = loads_json(cfg.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError):
                loaded = {}
            conf = loaded if isinstance(loaded, dict) else {}
        jinja = root / CHAT_TEMPLATE_FILE
        if jinja.is_file():
            source: str | None = jinja.read_text(encoding="utf-8")
        else:
            raw = conf.get("chat_template")
            if isinstance(raw, list):
                raw = {t.get("name"): t.get("template") for t in raw if isinstance(t, dict)}
            source = _default_template(raw)
        if source is None:
            return None
        special = []
        for key in SPECIAL_TOKENS:
            tok = conf.get(key)
            tok = tok.get("content") if isinstance(tok, dict) else tok
            if isinstance(tok, str):
                special.append((key, tok))
        return cls(source, tuple(special))

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The conversation's text (messages already checked by ``check_messages``)."""
        template = _compile(self.source)
        try:
            return template.render(messages=[dict(m) for m in messages], tools=None,
                                   documents=None, add_generation_prompt=add_generation_prompt,
                                   **dict(self.special_tokens))
        except _template_error() as e:
            raise RequestError(f"the model's chat template refused the conversation: "
                               f"{_one_line(e)}") from None
        except Exception as e:  # noqa: BLE001 - a template is code: any failure is one line
            raise RequestError(f"the model's chat template failed on the conversation "
                               f"({type(e).__name__}: {_one_line(e)})") from None


def _default_template(raw: Any) -> str | None:
    if isinstance(raw, dict):
        raw = raw.get("default")
    return raw if isinstance(raw, str) and raw else None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def _template_error() -> type[Exception]:
    import jinja2

    return jinja2.exceptions.TemplateError


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    """The compiled template, in the environment transformers renders chat templates in
    (``transformers.utils.chat_template_utils._compile_jinja_template``)."""
    try:
        import jinja2
        import jinja2.ext
        import jinja2.nodes
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise RequestError("chat needs jinja2 (pip install 'jinja2>=3.1.6')") from None

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask tag):
        rendered as its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class Namespace(jinja2.utils.Namespace):
        """jinja's namespace, refusing underscore-prefixed attributes (as transformers')."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot set underscore-prefixed attributes ({name!r})")

    class Dict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = Dict()
    env.globals["namespace"] = Namespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        raise RequestError(f"the model's chat template does not compile: {_one_line(e)}") from None


def _text(content: Any, where: str) -> str:
    """A message's content as one string: a string, or text parts joined with newlines."""
    if isinstance(content, str):
        text = content
    elif isinstance(content, (list, tuple)):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise RequestError(f"{where}.content[{j}] must be a text part "
                                   f"{{'type': 'text', 'text': str}}, got {kind!r}; this model "
                                   "takes text only")
            unknown = sorted(set(part) - {"type", "text"})
            if unknown:
                raise RequestError(f"{where}.content[{j}] has unsupported field {unknown[0]!r}; "
                                   "expected type, text")
            texts.append(part["text"])
        text = "\n".join(texts)
    else:
        raise RequestError(f"{where}.content must be a string or a list of text parts, got "
                           f"{type(content).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"{where}.content is not valid Unicode text ({e.reason} at index "
                           f"{e.start})") from None
    return text


def check_messages(messages: Any) -> list[dict[str, str]]:
    """The conversation as plain ``{"role", "content"[, "name"]}`` dicts, or a one-line
    RequestError naming the message and field that is wrong."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise RequestError(f"messages must be a list of {{role, content}} objects, got "
                           f"{type(messages).__name__}")
    if not messages:
        raise RequestError("messages is empty: expected at least one {role, content} message")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if callable(getattr(m, "model_dump", None)):  # a pydantic message (the openai types)
            m = m.model_dump()
        if not isinstance(m, Mapping):
            raise RequestError(f"{where} must be an object with role and content, got "
                               f"{type(m).__name__}")
        m = {k: v for k, v in m.items() if v is not None}
        unknown = sorted(str(k) for k in set(m) - set(MESSAGE_KEYS))
        if unknown:
            raise RequestError(f"{where} has unsupported field {unknown[0]!r}; expected "
                               f"{', '.join(MESSAGE_KEYS)} (no tools)")
        role = m.get("role")
        if role not in ROLES:
            raise RequestError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}")
        if "content" not in m:
            raise RequestError(f"{where} has no content")
        msg = {"role": role, "content": _text(m["content"], where)}
        if "name" in m:
            if not isinstance(m["name"], str):
                raise RequestError(f"{where}.name must be a string, got {type(m['name']).__name__}")
            msg["name"] = m["name"]
        out.append(msg)
    return out


def as_conversations(messages: Any) -> tuple[list[Any], bool]:
    """(conversations, single): one conversation (a list of messages) or a list of them."""
    if isinstance(messages, (list, tuple)) and messages and all(
            isinstance(c, (list, tuple)) for c in messages):
        return list(messages), False
    return [messages], True


def no_template_message(tokenizer: Tokenizer) -> str:
    who = f"model {tokenizer.source!r}" if tokenizer.source else "the model"
    return (f"{who} has no chat template (no {CHAT_TEMPLATE_FILE} and no 'chat_template' in "
            f"{TOKENIZER_CONFIG}): send text or token ids to completions/generate instead, or "
            "use a model with a chat template")


def chat_text(tokenizer: Tokenizer, messages: Any, add_generation_prompt: bool = True) -> str:
    """The conversation rendered by the model's chat template."""
    template = tokenizer.chat_template
    if template is None:
        raise RequestError(no_template_message(tokenizer))
    if not isinstance(add_generation_prompt, bool):
        raise RequestError(f"add_generation_prompt must be a bool, got {add_generation_prompt!r}")
    return template.render(check_messages(messages), add_generation_prompt)


def chat_ids(tokenizer: Tokenizer, messages: Any, add_generation_prompt: bool = True,
             max_tokens: int | None = None) -> list[int]:
    """The token ids of the conversation as the model sees them after its virtual tokens:
    the rendered template, tokenised without adding special tokens. ``max_tokens`` (the model's
    positions): a rendered text too long to fit is refused before it is tokenised."""
    text = chat_text(tokenizer, messages, add_generation_prompt)
    if max_tokens is not None:
        tokenizer.check_length(text, max_tokens, "the conversation")
    ids = tokenizer.encode(text, False)
    if not ids:
        raise RequestError("the chat template rendered the conversation to no tokens")
    return ids
