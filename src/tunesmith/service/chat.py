"""POST /v1/chat/completions: OpenAI's chat completion and chunk objects over our models."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tunesmith.errors import ServiceError
from tunesmith.models.generation import GenerationParams
from tunesmith.models.logprobs import TokenLogprob, openai_content
from tunesmith.service.audit import record_completion
from tunesmith.service.batching import Batcher, Ticket, batcher_for
from tunesmith.service.http_errors import bad_request, error_body
from tunesmith.service.inference import ModelCache
from tunesmith.service.lora import base_key, lora_source
from tunesmith.service.models import ModelSource, find_model
from tunesmith.service.prompt_cache import PromptPool
from tunesmith.service.schemas import ChatRequest
from tunesmith.service.settings import ServiceSettings
from tunesmith.service.store import Store
from tunesmith.service.tables import new_id

# Without max_tokens a reply may run to the end of the context; on CPU that can take minutes,
# so an unbounded request gets this many tokens at most.
DEFAULT_MAX_TOKENS = 512


@dataclass
class Prepared:
    """A validated request with its model loaded: ready to generate."""

    id: str
    created: int
    model_name: str
    model: Any
    tokenizer: Any
    messages: list[dict[str, str]]
    prompt_ids: list[int]
    params: GenerationParams
    n: int

    def choice_params(self, index: int) -> GenerationParams:
        """Choice ``index``'s parameters: seed + index, so choices differ and each repeats."""
        seed = self.params.seed
        return self.params if seed is None else replace(self.params, seed=seed + index)


def chat_messages(req: ChatRequest) -> list[dict[str, str]]:
    """The request's messages as plain role/content pairs (text only)."""
    out = []
    for i, m in enumerate(req.messages):
        if m.role in ("tool", "function"):
            raise bad_request("tool and function messages are not supported by this server",
                              param=f"messages[{i}].role")
        content = m.content
        if isinstance(content, list):
            kinds = {p.type for p in content} - {"text"}
            if kinds:
                raise bad_request(f"content parts of type {sorted(kinds)} are not supported; "
                                  "send text", param=f"messages[{i}].content")
            content = "\n".join(p.text or "" for p in content)
        out.append({"role": "system" if m.role == "developer" else m.role,
                    "content": content or ""})
    return out


def response_schema(req: ChatRequest) -> str | None:
    """The JSON schema ``response_format`` holds the reply to (``models.constrained``): any
    object for ``json_object``, ``json_schema.schema`` for ``json_schema``; None for text."""
    from tunesmith.errors import ConfigError
    from tunesmith.models.constrained import ANY_OBJECT, check_schema

    fmt = req.response_format or {}
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return ANY_OBJECT
    if kind != "json_schema":
        raise bad_request(f"response_format type {kind!r} is not supported; use 'text', "
                          "'json_object' or 'json_schema'", param="response_format.type")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise bad_request("response_format.json_schema needs a name and a schema: "
                          '{"name": "...", "schema": {...}}',
                          param="response_format.json_schema")
    try:
        return check_schema(spec.get("schema", {}))
    except ConfigError as err:
        raise bad_request(str(err), param="response_format.json_schema.schema") from None


def logit_bias(req: ChatRequest, vocab: int) -> tuple[tuple[int, float], ...]:
    """``logit_bias``'s (token id, bias) pairs; a key that is not a token id of the model's
    vocabulary (``vocab`` tokens) is the request's error."""
    pairs = []
    for key, bias in (req.logit_bias or {}).items():
        if not key.isdigit() or int(key) >= vocab:
            raise bad_request(f"logit_bias: {key!r} is not a token id of this model (0 to "
                              f"{vocab - 1})", param="logit_bias")
        pairs.append((int(key), bias))
    return tuple(pairs)


def _check_unsupported(req: ChatRequest) -> None:
    if req.tools:
        raise bad_request("tools are not supported by this server", param="tools")
    if req.audio is not None or set(req.modalities or ["text"]) != {"text"}:
        raise bad_request("this server answers in text only; leave out audio and give "
                          'modalities ["text"]', param="modalities")
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("logprobs must be set to true if top_logprobs is set",
                          param="top_logprobs")


class ChatService:
    """Chat completions over the configured, fine-tuned and checkpoint models."""

    def __init__(self, settings: ServiceSettings, store: Store, cache: ModelCache) -> None:
        self.settings, self.store, self.cache = settings, store, cache
        self.prompts = PromptPool(settings.prompt_cache_bytes)

    def _load(self, source: ModelSource) -> tuple[Any, Any]:
        from tunesmith.flows import load_checkpoint_for_chat, load_for_chat
        from tunesmith.models.resolve import resolve_model

        home = self.settings.home
        if source.kind == "checkpoint":
            step = source.step
            if step is None:  # find_model names a step for every checkpoint it finds
                raise ServiceError(f"checkpoint model '{source.name}' has no step number",
                                   status=500)
            return self.cache.get(source.name, lambda: load_checkpoint_for_chat(
                Path(source.ref), step, home=home))
        if source.kind == "base":  # shared with the LoRA fine-tunes of it
            path = resolve_model(source.ref, home=home)
            return self.cache.get_base(base_key(path),
                                       lambda: load_for_chat(str(path), home=home))
        loaded = self.cache.cached(source.name)
        if loaded is not None:
            return loaded
        lora = lora_source(Path(source.ref), home=home)
        if lora is None:  # a full fine-tune, or an adapter that cannot share its base
            return self.cache.get(source.name, lambda: load_for_chat(source.ref, home=home))
        return self.cache.get_adapter(
            source.name, lora, lambda: load_for_chat(str(lora.base_dir), home=home))

    def prepare(self, org: str, req: ChatRequest) -> Prepared:
        from tunesmith.data.encode import encode_prompt

        _check_unsupported(req)
        schema = response_schema(req)
        messages = chat_messages(req)
        model, tokenizer = self._load(find_model(self.store, self.settings, org, req.model,
                                                 "model"))
        prompt_ids = encode_prompt(tokenizer, messages)
        context = int(getattr(model.config, "max_position_embeddings", 2048))
        asked = req.max_completion_tokens or req.max_tokens
        room = context - len(prompt_ids)
        if room < 1 or (asked is not None and asked > room):
            raise bad_request(f"This model's maximum context length is {context} tokens. "
                              f"However, you requested {len(prompt_ids) + (asked or 1)} tokens "
                              f"({len(prompt_ids)} in the messages, {asked or 1} in the "
                              "completion). Please reduce the length of the messages or "
                              "completion.", param="messages", code="context_length_exceeded")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        if schema is not None:  # an unusable schema is the request's error, found now
            from tunesmith.errors import ConfigError
            from tunesmith.models.constrained import compile_schema

            try:
                compile_schema(tokenizer, schema)
            except ConfigError as err:
                raise bad_request(str(err), param="response_format") from None
        # OpenAI's defaults: temperature 1 and top_p 1 when the request leaves them out
        params = GenerationParams(
            max_new_tokens=asked or min(room, DEFAULT_MAX_TOKENS),
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, stop=stop, seed=req.seed,
            logprobs=(req.top_logprobs or 0) if req.logprobs else None, schema=schema,
            logit_bias=logit_bias(req, min(len(tokenizer), model.config.vocab_size)),
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0)
        return Prepared(id=new_id("chatcmpl-"), created=int(time.time()), model_name=req.model,
                        model=model, tokenizer=tokenizer, messages=messages,
                        prompt_ids=prompt_ids, params=params, n=req.n or 1)

    def _batcher(self, p: Prepared) -> Batcher:
        return batcher_for(p.model, max_batch=self.settings.max_batch,
                           window_s=self.settings.batch_window_ms / 1000, pool=self.prompts)

    def _submit(self, p: Prepared, *, streaming: bool) -> list[Ticket]:
        """The request's choices, queued together with the other requests to its model."""
        batcher = self._batcher(p)
        return [batcher.submit(Ticket(p.model, p.tokenizer, p.prompt_ids, p.choice_params(i),
                                      streaming=streaming))
                for i in range(p.n)]

    def _audit(self, org: str, p: Prepared, texts: list[str]) -> None:
        if self.settings.audit_log:
            record_completion(self.store, completion_id=p.id, org=org, model=p.model_name,
                              messages=p.messages, choices=texts,
                              params={"temperature": p.params.temperature,
                                      "top_p": p.params.top_p, "seed": p.params.seed,
                                      "max_tokens": p.params.max_new_tokens})

    def complete(self, org: str, req: ChatRequest) -> dict[str, Any]:
        p = self.prepare(org, req)
        choices, texts, used = [], [], 0
        tickets = self._submit(p, streaming=False)
        for i, ticket in enumerate(tickets):
            reply = ticket.result()
            texts.append(reply.text)
            used += reply.completion_tokens
            choices.append({"index": i, "message": {"role": "assistant", "content": reply.text,
                                                    "refusal": None},
                            "logprobs": _logprobs(p, reply.logprobs),
                            "finish_reason": reply.finish_reason})
        self._audit(org, p, texts)
        return {"id": p.id, "object": "chat.completion", "created": p.created,
                "model": p.model_name, "system_fingerprint": None, "choices": choices,
                "usage": _usage(len(p.prompt_ids), used, tickets[0].cached_tokens)}

    def stream(self, org: str, req: ChatRequest) -> Iterator[str]:
        """Server-sent events of ``chat.completion.chunk`` objects, then ``[DONE]``."""
        p = self.prepare(org, req)  # errors here still answer as plain JSON errors
        with_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            body = {"id": p.id, "object": "chat.completion.chunk", "created": p.created,
                    "model": p.model_name, "system_fingerprint": None, "choices": choices,
                    **({"usage": None} if with_usage else {}), **extra}
            return f"data: {json.dumps(body)}\n\n"

        def delta(i: int, d: dict[str, Any], reason: str | None = None,
                  logprobs: list[TokenLogprob] | None = None) -> dict[str, Any]:
            return {"index": i, "delta": d, "logprobs": _logprobs(p, logprobs),
                    "finish_reason": reason}

        def events() -> Iterator[str]:
            texts, used = [], 0
            tickets = self._submit(p, streaming=True)  # the choices generate side by side
            try:
                for i, ticket in enumerate(tickets):
                    yield chunk([delta(i, {"role": "assistant", "content": "", "refusal": None})])
                    for piece, entries in ticket.chunks():
                        yield chunk([delta(i, {"content": piece}, logprobs=entries
                                           if p.params.logprobs is not None else None)])
                    reply = ticket.result()
                    used += reply.completion_tokens
                    texts.append(reply.text)
                    yield chunk([delta(i, {}, reply.finish_reason)])
                if with_usage:
                    yield chunk([], usage=_usage(len(p.prompt_ids), used,
                                                 tickets[0].cached_tokens))
                self._audit(org, p, texts)
            except Exception as err:  # the status line is sent: report in-band, as OpenAI does
                yield f"data: {json.dumps(error_body(str(err), status=500))}\n\n"
            finally:  # the client went away: its rows stop at their next token
                for ticket in tickets:
                    ticket.cancel()
            yield "data: [DONE]\n\n"

        return events()


def _logprobs(p: Prepared, entries: Sequence[TokenLogprob] | None) -> dict[str, Any] | None:
    """A choice's (or a chunk's) ``logprobs`` object: None unless the request asked."""
    if entries is None:
        return None
    return {"content": openai_content(p.tokenizer, entries), "refusal": None}


def _usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    """OpenAI's usage object. ``cached``: the prompt tokens its first choice took from the
    prompt cache (``service.prompt_cache``); the others share them."""
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}
