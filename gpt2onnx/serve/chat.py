"""OpenAI's chat completions: messages -> one prompt through a chat template, rendered with
jinja2 as transformers renders ``apply_chat_template`` (a sandboxed environment with
``trim_blocks`` and ``lstrip_blocks``, ``raise_exception``, ``messages``,
``add_generation_prompt``, ``bos_token`` and ``eos_token``), then the completions path.

Where the template comes from, first match wins:
  1. ``--chat-template FILE`` (or the built-in name ``dialogpt``);
  2. the model folder's ``tokenizer_config.json`` ``chat_template``;
  3. none: every chat request gets a 400 saying how to give one. Never a guess.

DialoGPT was trained on turns joined by EOS, with no roles: the built-in ``dialogpt``
template writes each message's content followed by the EOS token.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from gpt2onnx.errors import InvalidParameterError
from gpt2onnx.runtime.model import Model
from gpt2onnx.serve.completion import (
    ChoiceDelta,
    Completion,
    EngineRequest,
    RowSpec,
    derive_seed,
)
from gpt2onnx.serve.engine import check_choices
from gpt2onnx.serve.errors import BadRequestError
from gpt2onnx.serve.protocol import (
    NEUTRAL,
    CompletionCall,
    StreamFormatter,
    _bool,
    _checked,
    _or_default,
    _params,
    check_model_name,
    parse_json_object,
    plan_row_checked,
    usage_body,
)

DIALOGPT = "dialogpt"
BUILT_IN = {DIALOGPT: "{% for message in messages %}{{ message['content'] }}{{ eos_token }}"
                      "{% endfor %}"}
ROLES = ("system", "user", "assistant", "developer")
# Chat fields this server does not implement: refused unless at their neutral value.
UNSUPPORTED = {"tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
               "function_call": (None, "none"), "response_format": (None, {"type": "text"}),
               "logit_bias": (None, {}), "audio": (None,), "modalities": (None, ["text"]),
               "prediction": (None,), "suffix": (None, ""), "prompt_logprobs": (None,),
               "echo": (None, False)}
NO_TEMPLATE = ("this model has no chat template: start the server with --chat-template FILE "
               "(a jinja2 template, as in a tokenizer_config.json's chat_template) or "
               "--chat-template dialogpt (turns joined by EOS), or use /v1/completions.")


class ChatTemplate:
    """A compiled chat template and the special tokens it may use."""

    def __init__(self, source: str, bos_token: str, eos_token: str, origin: str) -> None:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            self.template = env.from_string(source)
        except TemplateError as exc:
            raise InvalidParameterError("chat_template", f"the chat template from {origin} "
                                        f"does not compile: {exc}") from exc
        self.bos_token, self.eos_token, self.origin = bos_token, eos_token, origin

    def render(self, messages: list[dict[str, Any]]) -> str:
        from jinja2 import TemplateError

        try:
            return self.template.render(messages=messages, add_generation_prompt=True,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError as exc:
            raise BadRequestError(f"the chat template refused the messages: {exc}",
                                  "messages") from exc


def load_template(model: Model, option: str | None) -> ChatTemplate | None:
    """The template for ``model``: ``option`` (a file or a built-in name), else the folder's
    tokenizer_config.json ``chat_template``, else None."""
    config: dict[str, Any] = {}
    path = model.folder / "tokenizer_config.json"
    if path.is_file():
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = {}
    eos = model.tokenizer.id_to_token(model.manifest.eos_token_id) \
        if model.manifest.eos_token_id is not None else ""
    bos = model.tokenizer.id_to_token(model.manifest.bos_token_id) \
        if model.manifest.bos_token_id is not None else ""
    bos, eos = _token_text(config.get("bos_token"), bos), _token_text(config.get("eos_token"), eos)
    if option:
        if option in BUILT_IN:
            return ChatTemplate(BUILT_IN[option], bos, eos, f"the built-in {option!r}")
        check_template_file(option)
        return ChatTemplate(Path(option).read_text(encoding="utf-8", errors="replace"), bos,
                            eos, option)
    source = config.get("chat_template")
    if isinstance(source, list):  # [{"name": ..., "template": ...}]: transformers' default
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if isinstance(source, str) and source:
        return ChatTemplate(source, bos, eos, f"{path.name}")
    return None


def check_template_file(option: str) -> None:
    """Before the server starts: the file exists and compiles (rendering needs the model)."""
    file = Path(option)
    if not file.is_file():
        raise InvalidParameterError(
            "chat_template", f"--chat-template {option!r} is neither a file nor a built-in "
            f"template ({', '.join(BUILT_IN)}); pass a jinja2 template file.")
    ChatTemplate(file.read_text(encoding="utf-8", errors="replace"), "", "", str(file))


def _token_text(value: Any, fallback: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return fallback or ""


@dataclass(frozen=True)
class ChatCall:
    """One parsed POST /v1/chat/completions."""

    call: CompletionCall  # the prompt as a completion call
    top_logprobs: int | None  # None: no log-probs asked


def parse_chat(body: bytes, model: Model, served_name: str, max_choices: int,
               template: ChatTemplate | None, on_overflow: str = "error") -> ChatCall:
    """Validate a chat request body into a ``ChatCall``.

    Raises:
        BadRequestError: invalid JSON, messages, a field out of range, or no template (400).
        ModelNotFoundError: ``model`` names another model (404).
    """
    data = parse_json_object(body)
    check_model_name(data, served_name)
    for name, neutral in {**NEUTRAL, **UNSUPPORTED}.items():
        if name in data and data[name] not in neutral:
            raise BadRequestError(f"{name} is not supported by this server; leave it out.",
                                  name, "unsupported")
    text = chat_prompt(data.get("messages"), template)
    n = _or_default(data, "n", 1)
    _checked(check_choices, n, max_choices)
    stream = _bool(data, "stream")
    options = _or_default(data, "stream_options", {})
    if not isinstance(options, dict):
        raise BadRequestError(f"stream_options must be an object, got {options!r}.",
                              "stream_options", "invalid_type")
    include_usage = _bool(options, "include_usage", "stream_options.include_usage")
    wants_logprobs = _bool(data, "logprobs")
    top = _or_default(data, "top_logprobs", 0 if wants_logprobs else None)
    if top is not None and not wants_logprobs:
        raise BadRequestError("top_logprobs needs logprobs: true.", "top_logprobs",
                              "invalid_value")
    fields = dict(data)
    if data.get("max_completion_tokens") is not None:
        fields["max_tokens"] = data["max_completion_tokens"]
    fields["logprobs"] = top
    params = _params(fields, on_overflow)
    ids = model.encode(text)
    ids, _ = plan_row_checked(ids, params, model)
    rows = tuple(RowSpec(tuple(ids), derive_seed(params, j)) for j in range(n))
    call = CompletionCall(EngineRequest(rows, request_id=f"chatcmpl-{uuid.uuid4().hex}"),
                          served_name, int(time.time()), n, (text,), stream, False,
                          include_usage, params.logprobs)
    return ChatCall(call, top)


def chat_prompt(messages: Any, template: ChatTemplate | None) -> str:
    """Chat messages (as sent) rendered into one prompt; a 400 without a template."""
    if template is None:
        raise BadRequestError(NO_TEMPLATE, "messages", "no_chat_template")
    return template.render(_messages(messages))


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise BadRequestError("messages must be a non-empty list of {role, content} objects.",
                              "messages", "invalid_type" if value is not None else "missing")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequestError(f"{where} must be an object with role and content.",
                                  where, "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise BadRequestError(f"{where}.role must be one of {', '.join(ROLES)}, got "
                                  f"{role!r} (tool calls are not supported).", f"{where}.role",
                                  "invalid_value")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            parts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text"
                        and isinstance(part.get("text"), str)):
                    raise BadRequestError(f"{where}.content may hold only text parts "
                                          "({\"type\": \"text\", \"text\": ...}).",
                                          f"{where}.content", "invalid_type")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise BadRequestError(f"{where}.content must be a string or a list of text parts.",
                                  f"{where}.content", "invalid_type")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


class ChatFormatter(StreamFormatter):
    """Engine output as chat.completion JSON, or chat.completion.chunk SSE events."""

    chunk_object = "chat.completion.chunk"

    def __init__(self, chat: ChatCall, tokenizer: Tokenizer) -> None:
        super().__init__(chat.call, tokenizer)
        self.chat = chat

    def _head(self, kind: str | None = None) -> dict[str, Any]:
        return {**super()._head(kind), "system_fingerprint": None}

    def _logprobs(self, d: ChoiceDelta) -> dict[str, Any] | None:
        if self.chat.top_logprobs is None:
            return None
        content = []
        for e in d.logprobs:
            token = self._token_text(e.token_id)
            content.append({"token": token, "logprob": e.logprob,
                            "bytes": list(token.encode("utf-8")),
                            "top_logprobs": [{"token": (t := self._token_text(i)),
                                              "logprob": lp, "bytes": list(t.encode("utf-8"))}
                                             for i, lp in e.top[:self.chat.top_logprobs]]})
        return {"content": content}

    def response(self, completion: Completion) -> dict[str, Any]:
        choices = [{"index": d.index, "message": {"role": "assistant", "content": d.text},
                    "logprobs": self._logprobs(d), "finish_reason": d.finish_reason}
                   for d in completion.choices]
        return {**self._head("chat.completion"), "choices": choices,
                "usage": usage_body(completion.prompt_tokens, completion.completion_tokens)}

    def _chunk_choice(self, d: ChoiceDelta) -> dict[str, Any]:
        delta: dict[str, Any] = {"content": d.text}
        if d.index not in self.started:  # OpenAI names the role in a choice's first chunk
            self.started.add(d.index)
            delta = {"role": "assistant", **delta}
        return {"index": d.index, "delta": delta, "logprobs": self._logprobs(d),
                "finish_reason": d.finish_reason}
