"""A minimal HTTP service on the ldm-rt Python API: POST /generate returns a PNG, POST /generate/stream the step
previews and the image as Server-Sent Events, GET /health names the model.

    pip install 'ldm-rt[serve]'
    python examples/http_service/app.py --host 127.0.0.1 --port 8000      # --model DIR for your own artifacts
    curl -s -X POST localhost:8000/generate -H 'content-type: application/json' \
         -d '{"prompt": "a red circle on a white background", "steps": 20, "seed": 1}' -o circle.png

One Pipeline is loaded at start and shared by all requests: it holds no per-request state, so FastAPI's
thread pool runs requests concurrently (ONNX Runtime sessions are thread-safe).

LoRAs: `--lora FILE[:SCALE]` applies to every request; with `--lora-dir DIR` a request may also name LoRA files
of that folder (`"loras": [{"name": "style", "scale": 0.8}]`). A pipeline with those LoRAs applied is opened on
first use and kept for the next request naming the same set: at most `--lora-cache` sets, least recently used
dropped first, one opening at a time. Each kept set holds a whole copy of the model's sessions in memory.

What a request may cost is bounded before any work is done: the body size (413, checked against
Content-Length and counted while streaming), the service's own limits below (422 from pydantic, strict
JSON types), and the artifacts' size and batch ranges (422 from the pipeline's own validation, which owns them).
So is how many generations run at once (`--max-in-flight`; past it a 503 with Retry-After, at once).

Prompt features: `"prompt_weighting": true` reads A1111's emphasis, `(word:1.3)`; `--embedding FILE[:TOKEN]` loads
textual-inversion embeddings for every request. /generate/stream sends an `event: preview` per previewed step
(`preview_every`, `preview_kind`) and then `event: image` (or `event: error`), each a JSON `data:` line with a
base64 PNG; a request the pipeline refuses is a 422 before the stream starts.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint's annotations at runtime, and the request
# model is built per pipeline inside create_app (its scheduler choices are the loaded model's).

import base64
import contextlib
import functools
import io
import json
import math
import queue
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from ldm_rt.runtime.cli import BACKENDS
from ldm_rt.runtime.cli_support import OneLineParser, run
from ldm_rt.runtime.embeddings import EmbeddingError, parse_embedding_arg
from ldm_rt.runtime.files import inside
from ldm_rt.runtime.images import SOFTWARE, grid, png_bytes
from ldm_rt.runtime.lora import MAX_SCALE, SAFETENSORS_SUFFIX, LoraError, LoraSpec, parse_lora_arg
from ldm_rt.runtime.pipeline import Pipeline
from ldm_rt.runtime.previews import PREVIEW_KINDS

PROG = "ldm-rt-http"
# The service's policy on what one request may cost; the artifacts' own limits (size, batch, pixel multiple)
# and the scheduler's (steps <= its training timesteps) are checked by the pipeline.
MAX_PROMPT_CHARS = 2000  # far beyond any text encoder's context (77 tokens for CLIP); longer prompts are truncated
MAX_STEPS = 150
MAX_GUIDANCE = 50.0
# The largest valid body: two prompts of MAX_PROMPT_CHARS characters, each written as a JSON surrogate-pair
# escape (12 bytes), plus the small fields. Anything larger is refused (413) before it is read.
MAX_REQUEST_LORAS = 4  # per request, beside the service's own --lora ones
MAX_LORA_NAME_CHARS = 200
MAX_LORA_CACHE = 16  # pipelines kept open with request LoRAs: each is a whole copy of the model in memory
MAX_LORA_LISTING = 1000  # names /health lists
MAX_BODY_BYTES = 2 * MAX_PROMPT_CHARS * 12 + MAX_REQUEST_LORAS * (MAX_LORA_NAME_CHARS * 12 + 64) + 4096
LoraSet = tuple[tuple[str, float], ...]  # (file name in --lora-dir, scale), in the request's order
# Generations running at once (--max-in-flight): each holds its latents and the networks' activations in memory
# and shares the CPU with the others, so more at once only makes each slower. A request beyond the bound is a
# 503 at once (Retry-After: about one generation's time), not a wait in a queue the client cannot see.
DEFAULT_MAX_IN_FLIGHT = 4
MAX_IN_FLIGHT = 64


class LoraRef(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(max_length=MAX_LORA_NAME_CHARS)  # a .safetensors file of --lora-dir, with or without the suffix
    scale: float = Field(1.0, ge=-MAX_SCALE, le=MAX_SCALE, allow_inf_nan=False)


class LoraPipelines:
    """Pipelines with a request's LoRAs applied: opened on first use (one at a time: opening costs a model's
    memory and seconds), kept for the next request naming the same set, at most `size` sets, the least recently
    used dropped first (a request still running on it keeps it until it ends). Concurrent requests for a set
    being opened wait for that opening instead of starting another."""

    def __init__(self, folder: Path, open_pipeline: Callable[[list[LoraSpec]], Pipeline], size: int) -> None:
        self.folder, self._open, self.size = folder, open_pipeline, size
        self._kept: OrderedDict[LoraSet, Pipeline] = OrderedDict()
        self._opening: dict[LoraSet, Future] = {}
        self._lock = threading.Lock()  # guards _kept and _opening
        self._one_opening = threading.Lock()

    def path(self, name: str) -> Path:
        """The file `name` names in the folder; a LoraError (422) for anything else: no paths out of it."""
        file = name if name.lower().endswith(SAFETENSORS_SUFFIX) else name + SAFETENSORS_SUFFIX
        path = inside(self.folder, file)
        if path is None or "/" in file or not path.is_file():
            raise LoraError(f"loras: no LoRA named {name[:80]!r} in this service's LoRA folder; GET /health lists them")
        return path

    def names(self) -> list[str]:
        return sorted(p.name for p in self.folder.iterdir() if p.suffix.lower() == SAFETENSORS_SUFFIX)[:MAX_LORA_LISTING]

    def get(self, request: LoraSet) -> Pipeline:
        specs = [LoraSpec(self.path(name), scale) for name, scale in request]  # names checked before anything opens
        loras: LoraSet = tuple((s.path.name, s.scale) for s in specs)  # "style" and "style.safetensors" are one set
        with self._lock:
            if loras in self._kept:
                self._kept.move_to_end(loras)
                return self._kept[loras]
            waiting = self._opening.get(loras)
            if waiting is None:
                mine = self._opening[loras] = Future()
        if waiting is not None:
            return waiting.result()
        try:
            with self._one_opening:
                pipeline = self._open(specs)
        except BaseException as e:
            mine.set_exception(e)
            with self._lock:
                del self._opening[loras]
            raise
        with self._lock:
            self._kept[loras] = pipeline
            while len(self._kept) > self.size:
                self._kept.popitem(last=False)
            del self._opening[loras]
        mine.set_result(pipeline)
        return pipeline

    def kept(self) -> list[LoraSet]:
        with self._lock:
            return list(self._kept)


class InFlight:
    """At most `limit` generations at once; a request past that is refused (503) with a Retry-After of about
    one generation's time here (the running mean of the last ones; 1 s before any has finished)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit)
        self._seconds = 0.0  # mean duration of recent generations (exponential, weight 1/4 for the newest)

    def retry_after(self) -> int:
        return max(1, math.ceil(self._seconds))

    @contextlib.contextmanager
    def slot(self):
        if not self._slots.acquire(blocking=False):
            retry = self.retry_after()
            raise HTTPException(
                status_code=503, headers={"Retry-After": str(retry)},
                detail=f"busy: {self.limit} generations are running, the most this service runs at once (--max-in-flight); retry after {retry} s",
            )  # fmt: skip
        start = time.monotonic()
        try:
            yield
            seconds = time.monotonic() - start
            self._seconds = seconds if self._seconds == 0 else 0.75 * self._seconds + 0.25 * seconds
        finally:
            self._slots.release()

    def bounded(self, handler: Callable) -> Callable:
        """`handler` run in a slot (FastAPI reads the endpoint's signature through functools.wraps)."""

        @functools.wraps(handler)
        def in_slot(*args, **kwargs):
            with self.slot():
                return handler(*args, **kwargs)

        return in_slot


# ControlNet artifacts (built with --controlnet): a request carries one control image per ControlNet, in export order,
# as the base64 of its file (PNG, JPEG, ...). The body limit grows by this bound per ControlNet of the loaded model only.
MAX_CONTROL_IMAGE_BYTES = 8 << 20
MAX_CONTROL_IMAGE_CHARS = 4 * (MAX_CONTROL_IMAGE_BYTES // 3 + 1)


def decode_control_images(values: list[str]) -> list[Image.Image]:
    """The request's control images; a ValueError (422) naming the one that is not base64 of an image file."""
    images = []
    for k, value in enumerate(values):
        try:
            data = base64.b64decode(value, validate=True)
            if len(data) > MAX_CONTROL_IMAGE_BYTES:
                raise ValueError
            images.append(Image.open(io.BytesIO(data)))  # decoded by the runtime, after its size check
        except (ValueError, OSError):
            raise ValueError(f"control_images[{k}] is not the base64 of an image file (PNG, JPEG, ...) of at most {MAX_CONTROL_IMAGE_BYTES >> 20} MiB") from None
    return images


# pydantic refuses a string holding a lone surrogate (json.loads makes one of "\ud800"), which neither the
# tokenizer nor a PNG text chunk could encode.
Text = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]


def request_model(pipeline: Pipeline) -> type[BaseModel]:
    """The request body for this pipeline: its scheduler choices are the ones the loaded model can use
    (the runtime's registry, checked against the model's schedule at load); a request naming none gets the
    model's own (Pipeline.default_scheduler: the folder's scheduler class, as `ldm-rt sample`)."""
    schedulers = tuple(pipeline.schedulers)
    default_scheduler = pipeline.default_scheduler  # one of `schedulers`: the pipeline checks it at load

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
        loras: list[LoraRef] = Field([], max_length=MAX_REQUEST_LORAS)  # files of --lora-dir, on top of the service's own
        height: int | None = None  # None: the artifacts' optimum; range and multiple: the artifacts' (pipeline)
        width: int | None = None
        eta: float | None = Field(None, allow_inf_nan=False)  # None: the scheduler's own; range and who takes one: the runtime's
        prompt_weighting: bool = False  # A1111's (word:1.3) emphasis (runtime/prompt_weights.py); off: brackets are text

    if not pipeline.controlnets:
        return GenerateRequest  # control fields are then unknown fields: a 422 naming them
    count = len(pipeline.controlnets)

    class ControlNetRequest(GenerateRequest):
        # diffusers' names, as Pipeline.generate; values and ranges are the runtime's (runtime/controlnet.py).
        control_images: list[Annotated[str, Field(max_length=MAX_CONTROL_IMAGE_CHARS)]] = Field(min_length=count, max_length=count)
        controlnet_conditioning_scale: float | list[float] = 1.0
        control_guidance_start: float | list[float] = 0.0
        control_guidance_end: float | list[float] = 1.0
        guess_mode: bool = False

    return ControlNetRequest


def stream_request_model(base: type[BaseModel]) -> type[BaseModel]:
    """/generate/stream's body: /generate's and how often and how previews are drawn (runtime/previews.py)."""

    class StreamRequest(base):
        preview_every: int = Field(1, ge=1, le=MAX_STEPS)  # a preview every N steps, and the last
        preview_kind: Literal[PREVIEW_KINDS] = "fast"  # type: ignore[valid-type]  # fast: fitted latent -> RGB map; full: a VAE decode each

    return StreamRequest


def image_png(result_images, text: dict[str, str] | None = None) -> bytes:
    """A batch of (H, W, 3) uint8 images as one PNG (several: a grid)."""
    return png_bytes(grid(result_images) if len(result_images) > 1 else result_images[0], text or {})


def server_sent_event(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=True)}\n\n".encode()


class _ClientGone(Exception):
    """The stream's client went away: the preview callback ends its generation early."""


def _json(status: int, content: Any) -> Response:
    # ensure_ascii: a lone surrogate in a field name must not break the error response itself.
    return Response(json.dumps(content, ensure_ascii=True), status_code=status, media_type="application/json")


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    # Where and what, without echoing the input: FastAPI's default echo fails to encode NaN or a lone
    # surrogate (a 500), and would repeat a whole prompt back.
    detail = [{"type": e["type"], "loc": [str(p) for p in e["loc"]], "msg": e["msg"]} for e in exc.errors()]
    return _json(422, {"detail": detail})


def create_app(pipeline: Pipeline, lora_pipelines: LoraPipelines | None = None, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT) -> FastAPI:
    # max_body_size: FastAPI refuses (413) a Content-Length above it before reading, and counts streamed
    # (chunked) bodies as they arrive.
    app = FastAPI(
        title="ldm-rt", description="Latent diffusion sampling with the ldm-rt runtime.",
        max_body_size=MAX_BODY_BYTES + len(pipeline.controlnets) * (MAX_CONTROL_IMAGE_CHARS + 64),
        exception_handlers={RequestValidationError: _validation_error},
    )
    GenerateRequest = request_model(pipeline)
    StreamRequest = stream_request_model(GenerateRequest)
    in_flight = InFlight(max_in_flight)

    def run_request(fields: dict[str, Any], **extra: Any):
        """A request's generation (`fields`: its body's, `extra`: more generate() arguments) on its pipeline (the
        service's, or its LoRA set's); bad input: a 422."""
        fields = {**fields, **extra}
        loras: LoraSet = tuple((r["name"], r["scale"]) for r in fields.pop("loras"))
        try:
            if loras and lora_pipelines is None:
                raise LoraError("loras: this service takes no LoRAs per request (it was started without --lora-dir)")
            chosen = lora_pipelines.get(loras) if loras else pipeline
            if "control_images" in fields:
                fields["control_image"] = decode_control_images(fields.pop("control_images"))
            return chosen.generate(**fields)
        except ValueError as e:  # the library's bad-input errors (GenerationError, SchedulerConfigError) name the limit
            raise HTTPException(status_code=422, detail=str(e)) from None

    def params_text(result) -> dict[str, str]:
        return {"parameters": json.dumps(result.params, sort_keys=True), "Software": SOFTWARE[0]}

    # A sync handler: FastAPI runs it in its thread pool, so slow sampling does not block the event loop.
    @app.post("/generate", response_class=Response, responses={200: {"content": {"image/png": {}}}})
    @in_flight.bounded  # a LoRA set being opened counts too: the request waits for it in its slot
    def generate(request: GenerateRequest) -> Response:  # type: ignore[valid-type]
        result = run_request(request.model_dump())
        return Response(
            content=image_png(result.images, params_text(result)),
            media_type="image/png",
            headers={"x-seed": str(result.params["seed"]), "x-model-hash": result.params["model_hash"]},
        )

    @app.post("/generate/stream", response_class=StreamingResponse, responses={200: {"content": {"text/event-stream": {}}}})
    def generate_stream(request: StreamRequest) -> StreamingResponse:  # type: ignore[valid-type]
        """The generation in a thread of its own, holding its in-flight slot until it ends; its previews and image
        go through a queue to the response. The handler waits for the first event, so input the pipeline refuses
        (checked before the first step) is still a 422, not an error inside a 200 stream."""
        slot = contextlib.ExitStack()
        slot.enter_context(in_flight.slot())  # a 503 at once when full
        events: queue.Queue = queue.Queue()
        gone = threading.Event()
        fields = request.model_dump()
        every, kind = fields.pop("preview_every"), fields.pop("preview_kind")

        def preview(i: int, n: int, images) -> None:
            if gone.is_set():
                raise _ClientGone
            png = base64.b64encode(image_png(images)).decode("ascii")
            events.put(server_sent_event("preview", {"step": i + 1, "steps": n, "png": png}))

        def work() -> None:
            with slot:
                try:
                    result = run_request(fields, preview=preview, preview_every=every, preview_kind=kind)
                    png = base64.b64encode(image_png(result.images, params_text(result))).decode("ascii")
                    events.put(server_sent_event("image", {"seed": result.params["seed"], "params": result.params, "png": png}))
                except _ClientGone:
                    pass
                except HTTPException as e:  # bad input, found before the first step: the handler's 422
                    events.put(e)
                except Exception as e:  # a failure mid-run (a non-finite output): the stream says so and ends
                    events.put(server_sent_event("error", {"detail": str(e)[:500]}))
                events.put(None)

        try:
            threading.Thread(target=work, name="ldm-rt-stream", daemon=True).start()
        except BaseException:
            slot.close()
            raise
        first = events.get()
        if isinstance(first, HTTPException):
            raise first

        async def stream():
            try:
                item = first
                while item is not None:
                    yield server_sent_event("error", {"detail": item.detail}) if isinstance(item, HTTPException) else item
                    item = await anyio.to_thread.run_sync(events.get)
            finally:  # the stream ended, or the client went away (cancelled here): the next preview ends the run
                gone.set()

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"cache-control": "no-cache"})

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
            "loras": list(pipeline.loras),  # applied to every request
            **({"embeddings": list(pipeline.embeddings)} if pipeline.embeddings else {}),  # triggers every prompt may use
            **({"controlnets": len(pipeline.controlnets)} if pipeline.controlnets else {}),  # control_images a request must carry
            **({"lora_names": lora_pipelines.names()} if lora_pipelines is not None else {}),  # what requests may name
        }

    return app


def listen(host: str, port: int) -> socket.socket:
    """A listening socket (bound here, so the start line is printed only once the port is really ours)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    return socket.create_server((host, port), family=family)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog=PROG, description="Serve ldm-rt over HTTP (POST /generate -> PNG, /generate/stream -> previews, GET /health).")
    parser.add_argument("--model", type=Path, default=None, help="artifacts folder (default: the shipped default model)")
    parser.add_argument("--backend", default="onnxruntime", choices=BACKENDS, help="inference backend (default onnxruntime)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16"), help="which built precision to serve (default fp32)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per operator (default: one per physical core)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0: any free port, the start line says which)")
    parser.add_argument("--log-level", default="info", choices=("warning", "info", "debug"), help="info logs every request (default)")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                        help="apply a LoRA to every request (repeatable)")  # fmt: skip
    parser.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
                        help="load a textual-inversion embedding for every request (repeatable; TOKEN: its trigger word)")  # fmt: skip
    parser.add_argument("--lora-dir", type=Path, default=None, help="a folder of .safetensors LoRAs that requests may name (\"loras\")")
    parser.add_argument("--lora-cache", type=int, default=2, metavar="N",
                        help=f"LoRA sets kept open for the next request (default 2, 1..{MAX_LORA_CACHE}); each holds a copy of the model in memory")  # fmt: skip
    parser.add_argument("--max-in-flight", type=int, default=DEFAULT_MAX_IN_FLIGHT, metavar="N",
                        help=f"generations run at once (default {DEFAULT_MAX_IN_FLIGHT}, 1..{MAX_IN_FLIGHT}); more requests get 503 with Retry-After")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        args.lora = [parse_lora_arg(text) for text in args.lora]
        args.embedding = [parse_embedding_arg(text) for text in args.embedding]
    except (LoraError, EmbeddingError) as e:
        parser.error(str(e))
    if args.lora_dir is not None and not args.lora_dir.is_dir():
        parser.error(f"--lora-dir {args.lora_dir} is not a folder")
    if not 1 <= args.lora_cache <= MAX_LORA_CACHE:
        parser.error(f"--lora-cache must be 1..{MAX_LORA_CACHE}, got {args.lora_cache}")
    if not 1 <= args.max_in_flight <= MAX_IN_FLIGHT:
        parser.error(f"--max-in-flight must be 1..{MAX_IN_FLIGHT}, got {args.max_in_flight}")
    return run(PROG, lambda: serve(args))


def serve(args) -> int:
    """Load the pipeline and bind the port (a bad --model or a port in use is one line, exit 2), then serve until stopped."""
    options = dict(backend=args.backend, precision=args.precision, threads=args.threads, embeddings=args.embedding)
    pipeline = Pipeline.load(args.model, **options, loras=args.lora)
    lora_pipelines = None
    if args.lora_dir is not None:  # a request's LoRAs come on top of the service's own
        lora_pipelines = LoraPipelines(args.lora_dir, lambda specs: Pipeline.load(args.model, **options, loras=[*args.lora, *specs]), args.lora_cache)
    sock = listen(args.host, args.port)
    port = sock.getsockname()[1]
    url = f"http://[{args.host}]:{port}" if ":" in args.host else f"http://{args.host}:{port}"
    print(
        f"{PROG}: listening on {url} with model {pipeline.artifacts.root} ({pipeline.backend}, {pipeline.precision}, "
        f"sha256 {pipeline.artifacts.model_hash[:16]}); POST /generate, POST /generate/stream, GET /health",
        flush=True,
    )
    config = uvicorn.Config(create_app(pipeline, lora_pipelines, args.max_in_flight), host=args.host, port=port, log_level=args.log_level)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
