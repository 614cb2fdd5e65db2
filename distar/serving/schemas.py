"""Request and response models of the generator API, with the limits a client may ask for.

A request names no model, file or path: the model is fixed when the server is deployed, and unknown
fields are refused (`extra="forbid"`), so `{"model": ...}` or `{"out": ...}` is a 422 naming that field.
"""
from __future__ import annotations

import unicodedata
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, WithJsonSchema, field_validator

MAX_PROMPT_CHARS = 200        # the digits tokenizer reads 16 tokens; longer text is cut there anyway
MAX_PROMPTS = 8
MAX_COUNT = 16                # images per prompt
MAX_IMAGES = 32               # prompts x count in one request
MAX_REFERENCE_IMAGES = 2      # the multi-step reference costs ~100 network calls per image
MAX_SEED = 2**63 - 1
MAX_BODY_BYTES = 8192         # a request at every limit is ~2 KB of JSON


def _prompts(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ValueError(f"give a prompt string or a list of 1 to {MAX_PROMPTS} prompt strings")
    if len(items) > MAX_PROMPTS:
        raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(items)}")
    for i, p in enumerate(items):
        name = "prompt" if isinstance(value, str) else f"prompt {i}"
        if not isinstance(p, str):
            raise ValueError(f"{name} must be a string, got {type(p).__name__}")
        if not p.strip():
            raise ValueError(f"{name} is empty")
        if len(p) > MAX_PROMPT_CHARS:
            raise ValueError(f"{name} has {len(p)} characters, at most {MAX_PROMPT_CHARS} are allowed")
        if any(unicodedata.category(c) in ("Cc", "Cs") and c not in "\t\n\r" for c in p):
            raise ValueError(f"{name} contains control characters or unpaired surrogates")
    return tuple(items)


_PROMPT_SCHEMA = {"type": "string", "minLength": 1, "maxLength": MAX_PROMPT_CHARS, "pattern": r"\S"}
Prompts = Annotated[
    tuple[str, ...],
    BeforeValidator(_prompts),
    WithJsonSchema({"anyOf": [_PROMPT_SCHEMA, {"type": "array", "items": _PROMPT_SCHEMA, "minItems": 1,
                                               "maxItems": MAX_PROMPTS}],
                    "description": "one prompt, or a list of prompts (each gets `count` images)"}),
]


class GenerateRequest(BaseModel):
    """`count` images for each prompt. Image i of a prompt equals image i of
    `distar generate --prompt P --seed S --n COUNT` on the served model."""

    model_config = ConfigDict(extra="forbid", frozen=True,
                              json_schema_extra={"examples": [{"prompt": "a handwritten digit 3", "seed": 0}]})

    prompt: Prompts
    count: Annotated[int, Field(strict=True, ge=1, le=MAX_COUNT, description="images per prompt")] = 1
    seed: Annotated[int, Field(strict=True, ge=0, le=MAX_SEED,
                               description="noise seed; drawn by the server (and returned) when omitted")] | None = None
    format: Literal["auto", "png", "json"] = Field(
        "auto", description="png: the image as image/png (one image only); json: base64 PNGs; auto: png for one image")

    @field_validator("count")
    @classmethod
    def _total(cls, count: int, info: ValidationInfo) -> int:
        prompts = info.data.get("prompt")
        if prompts is not None and count * len(prompts) > MAX_IMAGES:
            raise ValueError(f"count {count} x {len(prompts)} prompts = {count * len(prompts)} images, "
                             f"at most {MAX_IMAGES} per request")
        return count

    @field_validator("format")
    @classmethod
    def _png_is_one_image(cls, fmt: str, info: ValidationInfo) -> str:
        prompts, count = info.data.get("prompt"), info.data.get("count")
        if fmt == "png" and prompts is not None and count is not None and len(prompts) * count > 1:
            raise ValueError("format 'png' returns a single image; use 'json' for several")
        return fmt

    @property
    def n_images(self) -> int:
        return len(self.prompt) * self.count


class GeneratedImage(BaseModel):
    prompt: str
    index: int = Field(description="position among this prompt's images")
    png_base64: str


class GenerateResponse(BaseModel):
    model: str
    seed: int
    seconds: float = Field(description="server time spent generating (batch queue included)")
    width: int
    height: int
    images: list[GeneratedImage]


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    reference: str | None
    device: str
    batching: bool
    image_size: list[int]


class ErrorItem(BaseModel):
    field: str
    message: str
    type: str


class ErrorResponse(BaseModel):
    message: str = Field(description="one line naming each offending field")
    detail: list[ErrorItem] | str
