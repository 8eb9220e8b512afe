"""The OpenAI completions wire format.

Request JSON -> ``CompletionCall`` (an ``EngineRequest`` plus how to shape the answer).
Values are checked by the same ``GenerationParams`` and ``plan_row`` the Python API uses,
so a 400 carries the message a Python caller would see, under the HTTP field's name.
Engine output -> response JSON, or server-sent-event chunks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer

from gpt2onnx.errors import InvalidParameterError, PromptTooLongError
from gpt2onnx.runtime.generator import TokenLogprob, plan_row
from gpt2onnx.runtime.model import Model
from gpt2onnx.runtime.params import GenerationParams
from gpt2onnx.serve.completion import (
    ChoiceDelta,
    Completion,
    EngineRequest,
    RowSpec,
    derive_seed,
)
from gpt2onnx.serve.engine import check_choices
from gpt2onnx.serve.errors import BadRequestError, ModelNotFoundError, ServeError

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# Runtime names -> the HTTP fields that set them.
HTTP_FIELD = {"max_new_tokens": "max_tokens"}
# OpenAI and vLLM fields this server does not implement: accepted only at their neutral
# value, refused otherwise (a client that sends them expects them to act).
NEUTRAL = {"suffix": (None, ""), "logit_bias": (None, {}), "stop_token_ids": (None, []),
           "include_stop_str_in_output": (None, False), "use_beam_search": (None, False),
           "length_penalty": (None, 1.0, 1), "guided_json": (None,), "guided_regex": (None,),
           "guided_choice": (None,), "guided_grammar": (None,), "guided_decoding_backend": (None,),
           "logits_processors": (None, []), "bad_words": (None, []),
           "allowed_token_ids": (None,), "truncate_prompt_tokens": (None,),
           "skip_special_tokens": (None, True), "spaces_between_special_tokens": (None, True)}
ON_OVERFLOW = ("error", "truncate")


@dataclass(frozen=True)
class CompletionCall:
    """One parsed POST /v1/completions."""

    request: EngineRequest
    model: str
    created: int
    n: int  # choices per prompt: choice i continues prompt i // n
    prompt_texts: tuple[str, ...]  # for echo
    stream: bool
    echo: bool
    include_usage: bool
    logprobs: int | None
    prompt_logprobs: int | None = None  # vLLM's field: per-choice prompt_logprobs


def parse_completion(body: bytes, model: Model, served_name: str, max_choices: int,
                     max_rows: int | None = None, on_overflow: str = "error"
                     ) -> CompletionCall:
    """Validate a request body into a ``CompletionCall``.

    Raises:
        BadRequestError: invalid JSON, a wrong type, or a value out of range (400).
        ModelNotFoundError: ``model`` names another model (404).
    """
    data = parse_json_object(body)
    check_model_name(data, served_name)
    for field, neutral in NEUTRAL.items():
        if data.get(field) not in neutral:
            raise BadRequestError(f"{field} is not supported by this server; leave it out.",
                                  field, "unsupported")
    n = _or_default(data, "n", 1)
    _checked(check_choices, n, max_choices)
    if data.get("best_of") not in (None, n):
        raise BadRequestError(f"best_of must equal n ({n}) here; leave it out.", "best_of",
                              "unsupported")
    stream, echo = _bool(data, "stream"), _bool(data, "echo")
    options = _or_default(data, "stream_options", {})
    if not isinstance(options, dict):
        raise BadRequestError(f"stream_options must be an object, got {options!r}.",
                              "stream_options", "invalid_type")
    include_usage = _bool(options, "include_usage", "stream_options.include_usage")
    params = _params(data, on_overflow)
    asked_prompt_logprobs = params.prompt_logprobs
    if echo and params.logprobs is not None:
        # echo + logprobs lists the prompt's tokens with their log-probs first (OpenAI's
        # legacy scoring call, what lm-evaluation-harness sends for loglikelihoods).
        params = params.with_(prompt_logprobs=max(params.logprobs,
                                                  params.prompt_logprobs or 0))

    if params.prompt_logprobs is not None and not model.manifest.any_logits:
        raise BadRequestError(
            model.manifest.last_position_only("prompt log-probs (echo with logprobs, "
                                              "prompt_logprobs)"),
            "echo" if echo else "prompt_logprobs", "unsupported")
    prompts = _prompts(data)
    limit = max_rows if max_rows is not None else max_choices
    if len(prompts) * n > limit:
        raise BadRequestError(f"{len(prompts)} prompts x n={n} asks for {len(prompts) * n} "
                              f"choices; this server queues at most {limit} per request. "
                              "Send fewer prompts per request.", "prompt")
    rows: list[RowSpec] = []
    texts: list[str] = []
    for prompt in prompts:
        ids = model.encode(prompt) if isinstance(prompt, str) else list(prompt)
        given = len(ids)
        ids, _ = _checked(plan_row, ids, params, model.context_length,
                          model.manifest.vocab_size)
        # Echoed as run: ids decode with their special tokens (text and text_offset agree),
        # and a prompt truncated to fit is echoed as truncated.
        texts.append(prompt if isinstance(prompt, str) and len(ids) == given
                     else model.tokenizer.decode(ids, skip_special_tokens=False))
        rows += [RowSpec(tuple(ids), derive_seed(params, j)) for j in range(n)]
    return CompletionCall(EngineRequest(tuple(rows)), served_name, int(time.time()), n,
                          tuple(texts), stream, echo, include_usage, params.logprobs,
                          asked_prompt_logprobs)


def check_model_name(data: dict[str, Any], served_name: str) -> None:
    name = data.get("model")
    if name is not None and name != served_name:
        raise ModelNotFoundError(f"model {name!r} is not served here; GET /v1/models lists "
                                 f"{served_name!r}.", "model")


def plan_row_checked(ids: list[int], params: GenerationParams, model: Model
                     ) -> tuple[list[int], int]:
    """``plan_row`` for an HTTP request: its errors are 400s under the HTTP field names."""
    return _checked(plan_row, ids, params, model.context_length, model.manifest.vocab_size)


# Requests are a few levels deep (messages -> content parts -> text); far deeper is an
# attack on the parser or on whoever walks the value later.
MAX_JSON_DEPTH = 32


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object whose strings are all valid Unicode, at most
    ``MAX_JSON_DEPTH`` levels deep; anything else is a 400 naming what is wrong."""
    try:
        data = json.loads(body)
    except RecursionError as exc:
        raise BadRequestError(f"the body nests JSON too deeply; at most {MAX_JSON_DEPTH} "
                              "levels are allowed.", None, "invalid_json") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequestError(f"the body is not valid JSON: {exc}.", None, "invalid_json") \
            from exc
    if not isinstance(data, dict):
        raise BadRequestError("the body must be a JSON object.", None, "invalid_type")
    _check_json_values(data)
    return data


def _check_json_values(data: dict[str, Any]) -> None:
    """No lone surrogates (JSON's "\\ud800" escape decodes to one, which no tokenizer or
    encoder takes) and no deep nesting, walked without recursion."""
    todo: list[tuple[Any, str, int]] = [(data, "", 1)]
    while todo:
        value, path, depth = todo.pop()
        if depth > MAX_JSON_DEPTH:
            raise BadRequestError(f"the body nests JSON {depth} levels deep at {path!r}; at "
                                  f"most {MAX_JSON_DEPTH} are allowed.", path.split(".")[0]
                                  or None, "invalid_json")
        if isinstance(value, dict):
            items = value.items()
        elif isinstance(value, list):
            items = ((str(i), v) for i, v in enumerate(value))
        else:
            if isinstance(value, str):
                _check_unicode(value, path)
            continue
        for key, item in items:
            _check_unicode(key, path)
            todo.append((item, f"{path}.{key}" if path else key, depth + 1))


def _check_unicode(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start:exc.end].encode("utf-8", "backslashreplace").decode()
        raise BadRequestError(
            f"{path or 'the body'} holds a lone UTF-16 surrogate ({bad} at character "
            f"{exc.start}), which is not text; send valid Unicode (pair each high "
            "surrogate \\ud800-\\udbff with a low one \\udc00-\\udfff).",
            path.split(".")[0] or None, "invalid_value") from exc


def _or_default(data: dict[str, Any], key: str, default: Any) -> Any:
    value = data.get(key)
    return default if value is None else value


def _bool(data: dict[str, Any], key: str, name: str | None = None) -> bool:
    value = _or_default(data, key, False)
    if not isinstance(value, bool):
        name = name or key
        raise BadRequestError(f"{name} must be true or false, got {value!r}.", name,
                              "invalid_type")
    return value


def _params(data: dict[str, Any], on_overflow: str = "error") -> GenerationParams:
    """The request's generation parameters; ``on_overflow`` is the server's default for
    prompts that do not fit with their max_tokens (``--on-overflow``)."""
    stop = _or_default(data, "stop", [])
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list):
        raise BadRequestError(f"stop must be a string or a list of strings, got {stop!r}.",
                              "stop", "invalid_type")
    return _checked(
        GenerationParams,
        max_new_tokens=_or_default(data, "max_tokens", DEFAULT_MAX_TOKENS),
        temperature=_or_default(data, "temperature", 1.0),  # OpenAI samples by default
        top_k=_or_default(data, "top_k", 0),
        top_p=_or_default(data, "top_p", 1.0),
        min_p=_or_default(data, "min_p", 0.0),
        repetition_penalty=_or_default(data, "repetition_penalty", 1.0),
        frequency_penalty=_or_default(data, "frequency_penalty", 0.0),
        presence_penalty=_or_default(data, "presence_penalty", 0.0),
        min_tokens=_or_default(data, "min_tokens", 0),
        seed=data.get("seed"),
        stop=tuple(stop),
        stop_on_eos=not _bool(data, "ignore_eos"),  # vLLM's extension, for benchmarks
        on_overflow=_or_default(data, "on_overflow", on_overflow),
        logprobs=data.get("logprobs"),
        prompt_logprobs=data.get("prompt_logprobs"),
    )


def _prompts(data: dict[str, Any]) -> list[str | list[int]]:
    """``prompt``: a string, a list of token ids, or a list of either (one per prompt)."""
    if "prompt" not in data or data["prompt"] is None:
        raise BadRequestError("prompt is required: a string or a list of token ids.",
                              "prompt", "missing")
    prompt = data["prompt"]
    if isinstance(prompt, str) or _is_ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and all(isinstance(p, str) or _is_ids(p) for p in prompt):
        return list(prompt)
    raise BadRequestError("prompt must be a string, a list of integer token ids, or a list "
                          f"of those; got {_short(prompt)}.", "prompt", "invalid_type")


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value)


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _checked(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a runtime validator; its InvalidParameterError becomes a 400 that names the
    HTTP field."""
    try:
        return fn(*args, **kwargs)
    except InvalidParameterError as exc:
        raise http_error(exc) from exc


def http_error(exc: InvalidParameterError) -> BadRequestError:
    """A runtime validation error as the 400 the server answers, under HTTP field names."""
    message = str(exc)
    for name, field in HTTP_FIELD.items():
        message = message.replace(name, field)
    code = "context_length_exceeded" if isinstance(exc, PromptTooLongError) else None
    return BadRequestError(message, HTTP_FIELD.get(exc.param, exc.param), code)


# ---- responses -------------------------------------------------------------------------


class StreamFormatter:
    """What completions and chat share: SSE chunks (one per choice and engine read), the
    usage chunk, and token texts. Subclasses say how a chunk's choice looks."""

    chunk_object = "text_completion"

    def __init__(self, call: CompletionCall, tokenizer: Tokenizer) -> None:
        self.call = call
        self.tokenizer = tokenizer
        self.started: set[int] = set()  # choices whose first chunk went out
        self.completion_tokens = 0

    def _head(self, kind: str | None = None) -> dict[str, Any]:
        c = self.call
        return {"id": c.request.request_id, "object": kind or self.chunk_object,
                "created": c.created, "model": c.model}

    def _chunk_choice(self, d: ChoiceDelta) -> dict[str, Any]:
        raise NotImplementedError

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def chunks(self, deltas: Sequence[ChoiceDelta]) -> str:
        """SSE events for one read of the engine: one chunk per choice, as OpenAI sends."""
        events = []
        for d in deltas:
            self.completion_tokens += len(d.token_ids)
            chunk = {**self._head(), "choices": [self._chunk_choice(d)]}
            if self.call.include_usage:
                chunk["usage"] = None
            events.append(sse(chunk))
        return "".join(events)

    def usage_chunk(self) -> str:
        """With ``stream_options.include_usage``: the last chunk, with no choices."""
        usage = usage_body(self.call.request.prompt_tokens, self.completion_tokens)
        return sse({**self._head(), "choices": [], "usage": usage})


class CompletionFormatter(StreamFormatter):
    """Turns one call's engine output into OpenAI JSON (whole, or SSE chunk by chunk)."""

    def __init__(self, call: CompletionCall, tokenizer: Tokenizer) -> None:
        super().__init__(call, tokenizer)
        self.offsets: dict[int, int] = {}  # choice -> text offset of its next token

    def _prefix(self, index: int) -> str:
        if not self.call.echo or index in self.started:
            return ""
        return self.call.prompt_texts[index // self.call.n]

    def _choice(self, d: ChoiceDelta) -> dict[str, Any]:
        first = d.index not in self.started
        text = self._prefix(d.index) + d.text
        self.started.add(d.index)
        choice: dict[str, Any] = {"index": d.index, "text": text, "logprobs": None,
                                  "finish_reason": d.finish_reason}
        if self.call.logprobs is not None:
            entries: list[TokenLogprob | None] = list(d.logprobs)
            ids = [e.token_id for e in d.logprobs]
            if first and self.call.echo:
                # The echoed prompt's tokens come first; its first token has no log-prob.
                ids = list(self.call.request.rows[d.index].prompt_ids) + ids
                entries = list(d.prompt_logprobs or [None] * (len(ids) - len(entries))) \
                    + entries
            choice["logprobs"] = self._logprobs(d.index, ids, entries)
        if first and self.call.prompt_logprobs is not None:
            n_top = self.call.prompt_logprobs  # echo may have asked the engine for more
            choice["prompt_logprobs"] = [
                None if e is None else {str(t): self._vllm_logprob(t, lp, e)
                                        for t, lp in ((e.token_id, e.logprob), *e.top[:n_top])}
                for e in d.prompt_logprobs or []]
        return choice

    def _vllm_logprob(self, token_id: int, logprob: float, entry: TokenLogprob
                      ) -> dict[str, Any]:
        """vLLM's prompt_logprobs entry: the prompt token's rank, 1..N for the top ones."""
        rank = entry.rank if token_id == entry.token_id else \
            1 + [t for t, _ in entry.top].index(token_id)
        return {"logprob": logprob, "rank": rank, "decoded_token": self._token_text(token_id)}

    def _logprobs(self, index: int, ids: Sequence[int],
                  entries: Sequence[TokenLogprob | None]) -> dict[str, Any]:
        tokens, offsets = [], []
        offset = self.offsets.get(index, 0)
        for token_id in ids:
            piece = self._token_text(token_id)
            tokens.append(piece)
            offsets.append(offset)
            offset += len(piece)
        self.offsets[index] = offset
        # OpenAI always lists the chosen token among the alternatives (up to N + 1).
        top = [None if e is None else {**{self._token_text(t): lp for t, lp in e.top},
                                       self._token_text(e.token_id): e.logprob}
               for e in entries]
        return {"tokens": tokens,
                "token_logprobs": [None if e is None else e.logprob for e in entries],
                "top_logprobs": top, "text_offset": offsets}

    def _chunk_choice(self, d: ChoiceDelta) -> dict[str, Any]:
        return self._choice(d)

    def response(self, completion: Completion) -> dict[str, Any]:
        """The non-streaming body."""
        choices = [self._choice(d) for d in completion.choices]
        return {**self._head(), "choices": choices,
                "usage": usage_body(completion.prompt_tokens, completion.completion_tokens),
                "system_fingerprint": None}


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"),
                                                                  ensure_ascii=False)
    return f"data: {data}\n\n"


def error_event(exc: ServeError) -> str:
    """An error after the stream started (the status line is already 200), as vLLM sends."""
    return sse(exc.to_body())


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
