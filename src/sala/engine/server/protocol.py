"""OpenAI request schemas (the subset ``sala serve`` implements) and their translation to ``SamplingParams``.

Kept apart from the engine's small internal types: the server validates here, then passes ``SamplingParams``.
Fields OpenAI defines but ``sala`` does not implement are accepted only at their neutral value, with a
specific error otherwise. Extensions (vLLM-style): ``top_k``, ``repetition_penalty``, ``min_tokens``,
``stop_token_ids``, ``ignore_eos``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sala.engine.types import RequestError, SamplingParams


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: bool | int | None = None
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, str):
            v = [v]
        if v is not None and (len(v) > 4 or any(not s for s in v)):
            raise ValueError("stop must be up to 4 non-empty strings")
        return v

    def check_unsupported(self) -> None:
        if self.n != 1:
            raise RequestError(f"n={self.n} is not supported; send one request per sample (n must be 1)", "unsupported", "n")
        if self.logprobs not in (None, False, 0):
            raise RequestError("logprobs are not supported", "unsupported", "logprobs")
        if self.frequency_penalty or self.presence_penalty:
            raise RequestError("frequency_penalty/presence_penalty are not supported; use repetition_penalty",
                               "unsupported", "frequency_penalty" if self.frequency_penalty else "presence_penalty")

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            repetition_penalty=self.repetition_penalty, stop=list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []), seed=self.seed, min_tokens=min(self.min_tokens, max_tokens),
            ignore_eos=self.ignore_eos,
        )


class CompletionRequest(_Common):
    """``POST /v1/completions``: one prompt (text or token ids) or a list of them."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise RequestError("prompt is empty", "empty_prompt", "prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.echo:
            raise RequestError("echo is not supported", "unsupported", "echo")
        if self.suffix:
            raise RequestError("suffix is not supported", "unsupported", "suffix")
        if self.best_of not in (None, 1):
            raise RequestError("best_of is not supported", "unsupported", "best_of")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Common):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.tools:
            raise RequestError("tools are not supported", "unsupported", "tools")

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
