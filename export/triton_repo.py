"""A Triton Inference Server model repository from a finished artifacts folder.

One Triton model per component and precision, named `<component>` (fp32 ONNX), `<component>_fp16`
(fp16 ONNX) and `<component>_trt_<precision>` (TensorRT plan, when engines were built). Each config.pbtxt
states the contract's tensor names, dtypes and dims with -1 for every dynamic axis; `max_batch_size: 0`
because the batch is an explicit (and, for the UNet, doubled under guidance) dimension of every tensor.

    <repo>/<model>/config.pbtxt
    <repo>/<model>/1/model.onnx | model.plan   (hard links to the artifacts where the filesystem allows)
    <repo>/ldm_rt_triton.json                   (marks the folder as ours; Triton reads only the folders)

The repository is replaced whole on a rebuild, so an existing folder is replaced only when it holds our
marker (or nothing): pointing --triton-repo at a repository with other models in it is refused.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import onnx

from ldm_rt.export.errors import ExportError
from ldm_rt.export.output import claim_output, output_path
from ldm_rt.runtime.atomic import atomic_directory
from ldm_rt.runtime.contracts import ComponentContract, TensorSpec
from ldm_rt.runtime.files import FileFormatError, read_json_object
from ldm_rt.runtime.manifest import FileEntry, Manifest

log = logging.getLogger(__name__)

TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}
PLATFORMS = {"onnx": "onnxruntime_onnx", "plan": "tensorrt_plan"}
MODEL_FILES = {"onnx": "model.onnx", "plan": "model.plan"}
TRITON_REPOSITORY = "ldm-rt Triton model repository"
MARKER = "ldm_rt_triton.json"
MARKER_FORMAT = "ldm-rt-triton-repository"
MAX_MARKER_BYTES = 1 << 20


def is_triton_repository(path: Path) -> bool:
    """A folder this module wrote (it holds our marker file)."""
    try:
        marker = read_json_object(path / MARKER, limit=MAX_MARKER_BYTES, what="repository marker")
    except FileFormatError:  # missing, oversized, not UTF-8, too deep, not an object: not ours
        return False
    return marker.get("format") == MARKER_FORMAT


def _dims(spec: TensorSpec) -> str:
    return ", ".join(str(s) if isinstance(s, int) else "-1" for s in spec.shape)


def _tensor_block(kind: str, specs: tuple[TensorSpec, ...]) -> str:
    entries = []
    for s in specs:
        entries.append(
            "  {\n"
            f'    name: "{s.name}"\n'
            f"    data_type: {TRITON_DTYPES[s.dtype]}\n"
            f"    dims: [ {_dims(s)} ]\n"
            "  }"
        )
    return f"{kind} [\n" + ",\n".join(entries) + "\n]\n"


def config_pbtxt(model_name: str, platform: str, contract: ComponentContract) -> str:
    """Triton's text-format ModelConfig for one component (contract I/O, explicit batch dims)."""
    return (
        f'name: "{model_name}"\n'
        f'platform: "{platform}"\n'
        "max_batch_size: 0\n"
        + _tensor_block("input", contract.inputs)
        + _tensor_block("output", contract.outputs)
    )


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _external_data_files(onnx_path: Path) -> list[str]:
    model = onnx.load(str(onnx_path), load_external_data=False)
    names = set()
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                names.add(entry.value)
    return sorted(names)


def _add_model(repo: Path, name: str, kind: str, contract: ComponentContract, source: Path) -> None:
    folder = repo / name
    version = folder / "1"
    version.mkdir(parents=True)
    (folder / "config.pbtxt").write_text(config_pbtxt(name, PLATFORMS[kind], contract))
    _link_or_copy(source, version / MODEL_FILES[kind])
    if kind == "onnx":
        # External weights keep their file name: the ONNX file refers to it by that relative location.
        for data in _external_data_files(source):
            _link_or_copy(source.parent / data, version / data)


def write_triton_repo(artifacts: Path, repo: Path) -> list[str]:
    """Write (atomically replace) a Triton model repository for the artifacts folder; returns model names."""
    artifacts, repo = Path(artifacts), output_path(repo)
    manifest = Manifest.read(artifacts)
    names: list[str] = []
    with claim_output(repo, is_triton_repository, TRITON_REPOSITORY), atomic_directory(repo) as tmp:
        for component, entry in manifest.components.items():
            for precision, pe in entry.precisions.items():
                name = component if precision == "fp32" else f"{component}_{precision}"
                _add_model(tmp, name, "onnx", entry.contract, manifest.verify_file(artifacts, pe.onnx))
                names.append(name)
            for record in entry.engines.values():
                name = f"{component}_trt_{record['precision']}"
                if name in names:
                    raise ExportError(f"two {record['precision']} engines for {component} in {artifacts}; rebuild the artifacts")
                plan = manifest.verify_file(artifacts, FileEntry(**record["engine"]))
                _add_model(tmp, name, "plan", entry.contract, plan)
                names.append(name)
        marker = {"format": MARKER_FORMAT, "artifacts": str(artifacts.resolve()), "models": names}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    log.info("Triton repository %s: %s", repo, ", ".join(names))
    return names
