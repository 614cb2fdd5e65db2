"""The HTTP face of a generator: a FastAPI app over any backend with async `generate(job)` and
`reference(job)` (an `AsyncGenerator` in-process, or the Ray Serve deployment with `@serve.batch`).

    GET  /            playground page (prompt, seed, image, time; the reference's image beside it)
    GET  /health      model names, device, batching
    POST /generate    GenerateRequest -> image/png (one image) or GenerateResponse (base64 PNGs)
    POST /reference   the same request answered by the multi-step reference, when one is deployed

Errors are JSON `{"message": "<field>: <why>", "detail": [...]}`: 400 malformed JSON, 413 body over
MAX_BODY_BYTES, 422 a field out of its limits or an unknown field, 404 no reference deployed.
"""
from __future__ import annotations

import base64
import time
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

from .playground import PAGE
from .schemas import (MAX_BODY_BYTES, MAX_REFERENCE_IMAGES, ErrorResponse, GeneratedImage, GenerateRequest,
                      GenerateResponse, HealthResponse)
from .service import Job


class Backend(Protocol):
    async def generate(self, job: Job) -> list[bytes]: ...
    async def reference(self, job: Job) -> list[bytes]: ...


def _error(status: int, message: str, detail: Any = None) -> JSONResponse:
    return JSONResponse({"message": message, "detail": detail if detail is not None else message}, status)


def _field(loc: tuple) -> str:
    parts = [str(p) for p in loc[1:]] if loc and loc[0] in ("body", "query", "path", "header") else list(map(str, loc))
    return parts[0] if parts and not parts[0].isdigit() else "body"


def _describe(err: dict) -> dict:
    field, msg = _field(tuple(err.get("loc", ()))), str(err.get("msg", ""))
    if err.get("type") == "json_invalid":
        msg = f"malformed JSON ({err.get('ctx', {}).get('error', msg)})"
    elif err.get("type") == "extra_forbidden":
        msg = f"unknown field (allowed: {', '.join(GenerateRequest.model_fields)}; the model is fixed by the server)"
    elif err.get("type") == "missing" and field == "body":
        msg = "a JSON object body is required (Content-Type: application/json)"
    return {"field": field, "message": msg.removeprefix("Value error, "), "type": str(err.get("type", ""))}


class BodyLimit:
    """ASGI middleware: refuse bodies over `max_bytes` (413) by Content-Length, or while they stream in."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await _error(413, f"body: {int(length)} bytes, at most {self.max_bytes}")(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, f"body: more than {self.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)


def build_api(backend: Backend, health: HealthResponse, title: str = "distar generator") -> FastAPI:
    app = FastAPI(title=title, version="1", description=__doc__)
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)
    errors = {400: {"model": ErrorResponse, "description": "malformed JSON"},
              413: {"model": ErrorResponse, "description": "body too large"},
              422: {"model": ErrorResponse, "description": "a field out of its limits, or an unknown field"}}
    ok = {200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                "description": "image/png for one image (headers X-Seed, X-Generation-Seconds), else JSON"}}

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        items = [_describe(e) for e in exc.errors()]
        status = 400 if any(i["type"] == "json_invalid" for i in items) else 422
        return _error(status, "; ".join(f"{i['field']}: {i['message']}" for i in items), items)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground() -> str:
        return PAGE

    @app.get("/health", response_model=HealthResponse)
    async def get_health() -> HealthResponse:
        return health

    async def answer(req: GenerateRequest, call, model: str) -> Response:
        job = Job.from_request(req)
        t0 = time.perf_counter()
        pngs = await call(job)
        secs = round(time.perf_counter() - t0, 6)
        headers = {"X-Seed": str(job.seed), "X-Model": model, "X-Generation-Seconds": f"{secs:.6f}"}
        if req.format == "png" or (req.format == "auto" and len(pngs) == 1):
            return Response(pngs[0], media_type="image/png", headers=headers)
        images = [GeneratedImage(prompt=p, index=i, png_base64=base64.b64encode(pngs[k * job.count + i]).decode())
                  for k, p in enumerate(job.prompts) for i in range(job.count)]
        body = GenerateResponse(model=model, seed=job.seed, seconds=secs, width=health.image_size[1],
                                height=health.image_size[0], images=images)
        return Response(body.model_dump_json(), media_type="application/json", headers=headers)

    @app.post("/generate", response_model=GenerateResponse, responses={**ok, **errors})
    async def generate(req: GenerateRequest) -> Response:
        return await answer(req, backend.generate, health.model)

    @app.post("/reference", response_model=GenerateResponse,
              responses={**ok, **errors, 404: {"model": ErrorResponse, "description": "no reference deployed"}})
    async def reference(req: GenerateRequest) -> Response:
        """The deployed reference (e.g. the 50-step teacher) for the same prompt and seed."""
        if health.reference is None:
            raise HTTPException(404, "reference: this server has no reference model")
        if req.n_images > MAX_REFERENCE_IMAGES:
            raise RequestValidationError([{"loc": ("body", "count"), "type": "less_than_equal",
                                           "msg": f"the reference draws at most {MAX_REFERENCE_IMAGES} images "
                                                  f"per request, asked for {req.n_images}"}])
        return await answer(req, backend.reference, health.reference)

    return app


def health_of(service, batching: bool, model: str | None = None, reference: str | None = None) -> HealthResponse:
    """`model`/`reference`: the names to show (the spec the operator gave), else the loaded models' own."""
    return HealthResponse(model=model or service.name, reference=reference or service.reference_name,
                          device=service.device,
                          batching=batching, image_size=service.image_size)
