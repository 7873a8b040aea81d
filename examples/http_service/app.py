"""A minimal HTTP service on the ldm-rt Python API: one POST /generate returning a PNG.

    pip install 'ldm-rt[serve]'
    python examples/http_service/app.py --model engines/build/tiny --host 127.0.0.1 --port 8000
    curl -s -X POST localhost:8000/generate -H 'content-type: application/json' \
         -d '{"prompt": "a red cube", "steps": 20, "seed": 1}' -o cube.png

One Pipeline is loaded at start and shared by all requests: it holds no per-request state, so FastAPI's
thread pool runs requests concurrently (ONNX Runtime sessions are thread-safe).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Literal

import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from ldm_rt.runtime.images import grid, png_bytes
from ldm_rt.runtime.params import GenerationError
from ldm_rt.runtime.pipeline import Pipeline
from ldm_rt.runtime.schedulers import SCHEDULERS

SchedulerName = Literal[tuple(SCHEDULERS)]  # type: ignore[valid-type]


class GenerateRequest(BaseModel):
    """Request bounds are the service's policy (cost per request); the artifacts' own limits (size range,
    batch range, pixel multiple) are checked by the pipeline and also answered with 422."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., max_length=2000)
    negative_prompt: str = Field("", max_length=2000)
    steps: int = Field(25, ge=1, le=150)
    guidance: float = Field(7.5, ge=0.0, le=50.0, allow_inf_nan=False)
    guidance_rescale: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    scheduler: SchedulerName = "ddim"
    seed: int | None = Field(None, ge=0, lt=2**63)
    batch: int = Field(1, ge=1, le=8)
    height: int | None = Field(None, ge=8, le=2048, multiple_of=8)
    width: int | None = Field(None, ge=8, le=2048, multiple_of=8)


def create_app(pipeline: Pipeline) -> FastAPI:
    app = FastAPI(title="ldm-rt", description="Latent diffusion sampling with the ldm-rt runtime.")

    # A sync handler: FastAPI runs it in its thread pool, so slow sampling does not block the event loop.
    @app.post("/generate", response_class=Response, responses={200: {"content": {"image/png": {}}}})
    def generate(request: GenerateRequest) -> Response:
        try:
            result = pipeline.generate(**request.model_dump())
        except GenerationError as e:
            raise HTTPException(status_code=422, detail=str(e)) from None
        image = grid(result.images) if len(result.images) > 1 else result.images[0]
        text = {"parameters": json.dumps(result.params, sort_keys=True), "Software": "ldm-rt"}
        return Response(
            content=png_bytes(image, text),
            media_type="image/png",
            headers={"x-seed": str(result.params["seed"]), "x-model-hash": result.params["model_hash"]},
        )

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve ldm-rt over HTTP (POST /generate -> PNG).")
    parser.add_argument("--model", type=Path, default=None, help="artifacts folder (default: the shipped default model)")
    parser.add_argument("--backend", default="onnxruntime", help="onnxruntime | tensorrt | torch")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16"))
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per operator (default: one per physical core)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    pipeline = Pipeline.load(args.model, backend=args.backend, precision=args.precision, threads=args.threads)
    uvicorn.run(create_app(pipeline), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
