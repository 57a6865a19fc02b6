"""OpenAI-compatible request/response models (pydantic only; no logic). Fields follow OpenAI's order;
hybridinfer's extensions are marked. The same models describe the API in /openapi.json.

Requests are strict, as OpenAI is: `max_tokens: true` or `stream: "yes"` are type errors, not coerced; NaN and
infinities are refused. Engine-specific sampling fields (top_k, ignore_eos, grammar, ...) pass through."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

_REQUEST = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")
_RESPONSE = ConfigDict(extra="allow")


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = _REQUEST
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        # Name the unsupported part instead of pydantic's "should be 'text'" for an image or audio part.
        if isinstance(data, dict) and isinstance(data.get("content"), list):
            for part in data["content"]:
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind != "text":
                    raise ValueError(f"'{kind}' content parts are not supported: this server runs a text-only "
                                     f"model; send text parts only")
        return data


class FunctionDef(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal["function"]
    function: FunctionDef


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    name: str | None = None
    schema_: dict[str, Any] | bool = Field(default=True, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a json_schema object: {\"name\": …, \"schema\": {…}}")
        return self


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = _REQUEST  # engine-specific sampling fields pass through (top_k, ignore_eos, ...)
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=2**31 - 1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    min_p: float | None = Field(default=None, ge=0, le=1)  # extension (llama.cpp)
    top_k: int | None = Field(default=None, ge=0, le=2**31 - 1)  # extension (llama.cpp)
    n: int | None = Field(default=None, ge=1, le=1, description="one choice per request (send n requests instead)")
    seed: int | None = Field(default=None, ge=-2**63, le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    ignore_eos: bool | None = None  # extension (llama.cpp)
    grammar: str | None = None  # extension (llama.cpp GBNF)


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=2**31 - 1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20, description="OpenAI's limit: at most 20")
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    # extension: "split" (default) puts <think>…</think> into reasoning_content; "raw" keeps it in content
    reasoning_format: Literal["split", "raw"] = "split"


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(min_length=1)
    echo: bool = False


class TokenizeRequest(BaseModel):
    """llama-server's shape: {"content": text} -> {"tokens": [...]}."""
    model_config = ConfigDict(strict=True, extra="allow")
    content: str


# --- responses (documentation of what the server sends; extra fields allowed) ------------------------------

class Usage(BaseModel):
    model_config = _RESPONSE
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ResponseMessage(BaseModel):
    model_config = _RESPONSE
    role: str
    content: str | None = None
    reasoning_content: str | None = None  # extension: the thought of a reasoning model


class ChatChoice(BaseModel):
    model_config = _RESPONSE
    index: int
    message: ResponseMessage
    finish_reason: str | None = None


class ChatCompletion(BaseModel):
    model_config = _RESPONSE
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    model_config = _RESPONSE
    index: int
    text: str
    finish_reason: str | None = None


class Completion(BaseModel):
    model_config = _RESPONSE
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class Model(BaseModel):
    model_config = _RESPONSE
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int  # extension: context tokens per slot
    chat_template: bool = True  # extension: False for a base model (its GGUF has no chat template)
    chat_template_note: str | None = None  # extension: what chat requests do then, and to use /v1/completions


class ModelList(BaseModel):
    model_config = _RESPONSE
    object: Literal["list"]
    data: list[Model]


class Tokens(BaseModel):
    tokens: list[int]


class Health(BaseModel):
    model_config = _RESPONSE
    status: str
    model: str
    engine_restarts: int
    in_flight: int
    queued: int
    slots: int
    request_timeout_s: float | None = None  # serve's limit for a whole non-streamed answer
    engine_processing: int | None = None  # requests the engine itself is working on (None: it does not say)
    engine_processing_age_s: float | None = None  # how old that figure is (the engine answers between batches)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
