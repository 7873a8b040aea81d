"""A minimal HTTP service on the ldm-rt Python API: POST /generate returns a PNG, GET /health names the model.

    pip install 'ldm-rt[serve]'
    python examples/http_service/app.py --host 127.0.0.1 --port 8000      # --model DIR for your own artifacts
    curl -s -X POST localhost:8000/generate -H 'content-type: application/json' \
         -d '{"prompt": "a red circle on a white background", "steps": 20, "seed": 1}' -o circle.png

One Pipeline is loaded at start and shared by all requests: it holds no per-request state, so FastAPI's
thread pool runs requests concurrently (ONNX Runtime sessions are thread-safe).

What a request may cost is bounded before any work is done: the body size (413, checked against
Content-Length and counted while streaming), the service's own limits below (422 from pydantic, strict
JSON types), and the artifacts' size and batch ranges (422 from the pipeline's own validation, which owns them).
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint's annotations at runtime, and the request
# model is built per pipeline inside create_app (its scheduler choices are the loaded model's).

import json
import socket
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from ldm_rt.runtime.cli import BACKENDS
from ldm_rt.runtime.cli_support import OneLineParser, run
from ldm_rt.runtime.images import grid, png_bytes
from ldm_rt.runtime.pipeline import Pipeline

PROG = "ldm-rt-http"
# The service's policy on what one request may cost; the artifacts' own limits (size, batch, pixel multiple)
# and the scheduler's (steps <= its training timesteps) are checked by the pipeline.
MAX_PROMPT_CHARS = 2000  # far beyond any text encoder's context (77 tokens for CLIP); longer prompts are truncated
MAX_STEPS = 150
MAX_GUIDANCE = 50.0
# The largest valid body: two prompts of MAX_PROMPT_CHARS characters, each written as a JSON surrogate-pair
# escape (12 bytes), plus the small fields. Anything larger is refused (413) before it is read.
MAX_BODY_BYTES = 2 * MAX_PROMPT_CHARS * 12 + 4096


# pydantic refuses a string holding a lone surrogate (json.loads makes one of "\ud800"), which neither the
# tokenizer nor a PNG text chunk could encode.
Text = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]


def request_model(pipeline: Pipeline) -> type[BaseModel]:
    """The request body for this pipeline: its scheduler choices are the ones the loaded model can use
    (the runtime's registry, checked against the model's schedule at load)."""
    schedulers = tuple(pipeline.schedulers)
    default_scheduler = "ddim" if "ddim" in schedulers else schedulers[0]

    class GenerateRequest(BaseModel):
        # strict: JSON true is not a step count, "3" not a number; extra: a misspelt field is an error.
        model_config = ConfigDict(extra="forbid", strict=True)

        prompt: Text
        negative_prompt: Text = ""
        steps: int = Field(25, ge=1, le=MAX_STEPS)
        guidance: float = Field(7.5, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False)
        guidance_rescale: float = Field(0.0, allow_inf_nan=False)  # range: the pipeline's
        scheduler: Literal[schedulers] = default_scheduler  # type: ignore[valid-type]
        seed: int | None = Field(None, ge=0, lt=2**63)
        batch: int = 1  # range: the artifacts' (pipeline)
        height: int | None = None  # None: the artifacts' optimum; range and multiple: the artifacts' (pipeline)
        width: int | None = None

    return GenerateRequest


def _json(status: int, content: Any) -> Response:
    # ensure_ascii: a lone surrogate in a field name must not break the error response itself.
    return Response(json.dumps(content, ensure_ascii=True), status_code=status, media_type="application/json")


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    # Where and what, without echoing the input: FastAPI's default echo fails to encode NaN or a lone
    # surrogate (a 500), and would repeat a whole prompt back.
    detail = [{"type": e["type"], "loc": [str(p) for p in e["loc"]], "msg": e["msg"]} for e in exc.errors()]
    return _json(422, {"detail": detail})


def create_app(pipeline: Pipeline) -> FastAPI:
    # max_body_size: FastAPI refuses (413) a Content-Length above it before reading, and counts streamed
    # (chunked) bodies as they arrive.
    app = FastAPI(
        title="ldm-rt", description="Latent diffusion sampling with the ldm-rt runtime.", max_body_size=MAX_BODY_BYTES,
        exception_handlers={RequestValidationError: _validation_error},
    )
    GenerateRequest = request_model(pipeline)

    # A sync handler: FastAPI runs it in its thread pool, so slow sampling does not block the event loop.
    @app.post("/generate", response_class=Response, responses={200: {"content": {"image/png": {}}}})
    def generate(request: GenerateRequest) -> Response:  # type: ignore[valid-type]
        try:
            result = pipeline.generate(**request.model_dump())
        except ValueError as e:  # the library's bad-input errors (GenerationError, SchedulerConfigError) name the limit
            raise HTTPException(status_code=422, detail=str(e)) from None
        image = grid(result.images) if len(result.images) > 1 else result.images[0]
        text = {"parameters": json.dumps(result.params, sort_keys=True), "Software": "ldm-rt"}
        return Response(
            content=png_bytes(image, text),
            media_type="image/png",
            headers={"x-seed": str(result.params["seed"]), "x-model-hash": result.params["model_hash"]},
        )

    @app.get("/health")
    def health() -> dict[str, Any]:
        """The model is loaded (requests are answered only after it is) and which one it is."""
        return {
            "status": "ok",
            "model": str(pipeline.artifacts.root),
            "model_hash": pipeline.artifacts.model_hash,
            "backend": pipeline.backend,
            "precision": pipeline.precision,
            "schedulers": list(pipeline.schedulers),
        }

    return app


def listen(host: str, port: int) -> socket.socket:
    """A listening socket (bound here, so the start line is printed only once the port is really ours)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    return socket.create_server((host, port), family=family)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog=PROG, description="Serve ldm-rt over HTTP (POST /generate -> PNG, GET /health).")
    parser.add_argument("--model", type=Path, default=None, help="artifacts folder (default: the shipped default model)")
    parser.add_argument("--backend", default="onnxruntime", choices=BACKENDS, help="inference backend (default onnxruntime)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16"), help="which built precision to serve (default fp32)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per operator (default: one per physical core)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0: any free port, the start line says which)")
    parser.add_argument("--log-level", default="info", choices=("warning", "info", "debug"), help="info logs every request (default)")
    args = parser.parse_args(argv)
    return run(PROG, lambda: serve(args))


def serve(args) -> int:
    """Load the pipeline and bind the port (a bad --model or a port in use is one line, exit 2), then serve until stopped."""
    pipeline = Pipeline.load(args.model, backend=args.backend, precision=args.precision, threads=args.threads)
    sock = listen(args.host, args.port)
    port = sock.getsockname()[1]
    url = f"http://[{args.host}]:{port}" if ":" in args.host else f"http://{args.host}:{port}"
    print(
        f"{PROG}: listening on {url} with model {pipeline.artifacts.root} ({pipeline.backend}, {pipeline.precision}, "
        f"sha256 {pipeline.artifacts.model_hash[:16]}); POST /generate, GET /health",
        flush=True,
    )
    config = uvicorn.Config(create_app(pipeline), host=args.host, port=port, log_level=args.log_level)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
