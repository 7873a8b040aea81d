"""End to end: tiny models through `build_engines.py` (in-process), and what a finished folder must hold."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from google.protobuf import text_format
from test_runtime_fixtures import exported_run
from tiny_models import make_tiny_ldm_rt_model, make_tiny_single_file
from tritonclient.grpc import model_config_pb2

import ldm_rt.export.build as build_module
from ldm_rt.export.build_engines import main, options_from_args, parser
from ldm_rt.export.errors import ExportError, TensorRTUnavailable
from ldm_rt.export.parity import ort_session
from ldm_rt.export.sources import load_source
from ldm_rt.export.triton_repo import MARKER, MARKER_FORMAT, MAX_MARKER_BYTES, is_triton_repository
from ldm_rt.reference.export_wrappers import export_wrappers
from ldm_rt.reference.model_folder import load_model_folder
from ldm_rt.reference.torch_backend import unlimited_profile
from ldm_rt.runtime.artifacts import Artifacts
from ldm_rt.runtime.contracts import ModelFacts, ShapeProfile
from ldm_rt.runtime.manifest import MANIFEST, Manifest

# Small profile: latent sizes 4..12 (pixel multiple 4 for the tiny models), UNet batch up to 4.
PROFILE = ["--batch-range", "1:1:2", "--height-range", "8:16:24", "--width-range", "8:16:24"]
HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str


def run_cli(args: list[str]) -> Run:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return Run(code, out.getvalue(), err.getvalue())


@dataclass
class Built:
    model: Path
    out: Path
    triton: Path | None
    run: Run


@pytest.fixture(scope="module")
def ldm_rt_build(tmp_path_factory) -> Built:
    """The tiny ldm-rt model with --fp16 and no --onnx-only: without TensorRT this ends in exit 1."""
    root = tmp_path_factory.mktemp("export_ldm_rt")
    model = make_tiny_ldm_rt_model(root / "model")
    out, triton = root / "artifacts", root / "triton"
    run = run_cli(["--model", str(model), "--out", str(out), "--fp16", "--triton-repo", str(triton), *PROFILE])
    return Built(model, out, triton, run)


@pytest.fixture(scope="module")
def diffusers_build(tmp_path_factory, tiny_sd_v1) -> Built:
    """The tiny diffusers-layout SD v1 folder with --fp16 --onnx-only and PROFILE: the session's export of it, which the
    runtime tests share (test_runtime_fixtures.exported_run runs this command)."""
    out, (code, stdout, stderr) = exported_run(tmp_path_factory, tiny_sd_v1, fp16=True)
    return Built(tiny_sd_v1, out, None, Run(code, stdout, stderr))


@pytest.fixture(scope="module")
def plain_build(ldm_rt_build, tmp_path_factory) -> Built:
    """No --fp16, --onnx-only or --engines, over a copy of an earlier artifacts folder (a rebuild in place) with
    hidden leftovers of killed builds beside it. The profile reaches 4096 px; --parity-memory 0.05 (GiB) keeps
    each parity run within 50 MiB, so the largest points are checked at a bounded size."""
    root = tmp_path_factory.mktemp("export_plain")
    out = root / "artifacts"
    shutil.copytree(ldm_rt_build.out, out)
    for leftover in (".artifacts.k1lled00.tmp", ".artifacts.k1lled01.old", ".artifacts2.k1lled02.tmp"):
        (root / leftover).mkdir()
        (root / leftover / "half.onnx").write_bytes(b"x")
    big = ["--batch-range", "1:1:2", "--height-range", "8:16:4096", "--width-range", "8:16:4096", "--parity-memory", "0.05"]
    run = run_cli(["--model", str(ldm_rt_build.model), "--out", str(out), *big])
    return Built(ldm_rt_build.model, out, None, run)


def test_without_engines_asked_for_a_missing_tensorrt_is_a_note_and_exit_0(plain_build):
    run = plain_build.run
    assert run.code == 0, run.stderr
    assert "Traceback" not in run.stderr and "build_engines.py: error" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    manifest = Manifest.read(plain_build.out)
    if HAVE_TENSORRT:
        assert manifest.tensorrt["status"] == "built"
    else:
        assert last.startswith("build_engines.py: note: engines skipped: TensorRT/CUDA not found: ")
        assert last.endswith("; pass --engines to make this an error")
        assert manifest.tensorrt["status"] == "unavailable"
    assert set(manifest.components) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}


def test_rebuild_in_place_clears_leftovers_of_killed_builds_only(plain_build, ldm_rt_build):
    root = plain_build.out.parent
    # The earlier folder was replaced (a new manifest), the killed builds' leftovers are gone, the lock file
    # is removed at the end, and a sibling output's temp folder is left alone.
    assert Manifest.read(plain_build.out).created and (plain_build.out / MANIFEST).read_bytes() != (ldm_rt_build.out / MANIFEST).read_bytes()
    assert sorted(p.name for p in root.iterdir()) == [".artifacts2.k1lled02.tmp", "artifacts"]


def test_parity_of_a_profile_too_large_for_memory_is_checked_at_a_bounded_size(plain_build):
    run, m = plain_build.run, Manifest.read(plain_build.out)
    notes = [line for line in run.stderr.splitlines() if line.startswith("build_engines.py: note: ") and "parity" in line]
    text = m.components["text_encoder"]
    assert text.precisions["fp32"].parity["largest_checked"] == {"text_batch": 4}  # small: checked as it is
    assert "bounded" not in text.precisions["fp32"].parity
    for name in ("unet", "vae_decoder", "vae_encoder"):
        entry = m.components[name]
        parity = entry.precisions["fp32"].parity
        largest = parity["largest_checked"]
        # Bounded: above opt (latent 8), well below the profile's 2048, and really checked.
        assert 8 < largest["latent_height"] < 2048 and 8 < largest["latent_width"] < 2048, largest
        assert parity["passed"] and len(parity["shapes"]) == len(parity["max_abs_err"]) >= 3
        biggest = max(parity["shapes"], key=lambda shape: np.prod(next(iter(shape.values()))))
        assert next(iter(biggest.values()))[-1] == largest["latent_width"] * (2 if name == "vae_encoder" else 1)
        assert parity["bounded"].startswith("parity at the profile's maximum (")
        assert "more than the 0.05 GiB it may use; checked at " in parity["bounded"]
        assert entry.precisions["fp32"].ort is None or entry.precisions["fp32"].ort.parity["shapes"] == parity["shapes"]
        assert sum(f"note: {name}: parity at the profile's maximum" in line for line in notes) == 1, run.stderr


def test_every_phase_reports_progress(plain_build, ldm_rt_build):
    lines = plain_build.run.stderr.splitlines()
    components = ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    for i, name in enumerate(components, start=1):
        prefix = f"[{i}/4] {name}: "
        mine = [line.removeprefix(prefix) for line in lines if line.startswith(prefix)]
        for phase in ("onnx export fp32", "parity plan", "reference outputs (torch fp32)", "parity fp32 (onnxruntime-cpu)"):
            started = [line for line in mine if line.startswith(phase) and line.endswith(" ...")]
            done = [line for line in mine if line.startswith(phase) and re.search(r": done in \d+\.\ds$", line)]
            assert len(started) == 1 and len(done) == 1, (name, phase, mine)
        # One line per parity case, counted and timed, naming the shapes.
        cases = [line for line in mine if line.startswith("parity fp32 (onnxruntime-cpu): ") and "done in" not in line]
        assert len(cases) >= 3 and all(re.search(r": \d+/\d+ \w+=[\dx]+.* \(\d+\.\ds\)$", c) for c in cases), cases
    # The fp16 search reports each case of each round.
    fp16 = [line for line in ldm_rt_build.run.stderr.splitlines() if "fp16 search" in line]
    assert any(re.search(r"fp16 search .*: 1 round 1 \(0 fp32 islands\), \w+=", line) for line in fp16), fp16
    assert sum("done in" in line for line in fp16) == 4


def test_peak_memory_of_each_component_is_printed_and_recorded(plain_build):
    m = Manifest.read(plain_build.out)
    lines = plain_build.run.stderr.splitlines()
    for i, (name, entry) in enumerate(m.components.items(), start=1):
        peak, process = entry.export["peak_rss_bytes"], entry.export["process_peak_rss_bytes"]
        assert 50e6 < peak <= process < 64e9, (name, entry.export)  # a python with torch, at most the process's peak
        assert any(re.fullmatch(rf"\[{i}/4\] {name}: peak RSS \d+\.\d\d GB \(export process so far: \d+\.\d\d GB\)", line) for line in lines), name


@pytest.fixture(params=["ldm_rt", "diffusers"])
def built(request, ldm_rt_build, diffusers_build) -> Built:
    return {"ldm_rt": ldm_rt_build, "diffusers": diffusers_build}[request.param]


@pytest.mark.skipif(HAVE_TENSORRT, reason="TensorRT is installed: the no-TensorRT exit path cannot be shown here")
def test_fp16_without_tensorrt_finishes_onnx_then_exits_1_with_the_line(ldm_rt_build):
    """--fp16 asks for fp16 engines: without TensorRT that is an error (exit 1), after the ONNX is finished."""
    run = ldm_rt_build.run
    expected = TensorRTUnavailable.for_folder("the tensorrt package is not installed", str(ldm_rt_build.out))
    assert run.code == 1, run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        f"build_engines.py: error: --fp16 (without --onnx-only) asks for TensorRT engines, but {expected}"
    )
    assert "Traceback" not in run.stderr
    assert str(expected).startswith("TensorRT/CUDA not found: ")
    assert f"(`ldm-rt sample --model {ldm_rt_build.out}`)" in str(expected)
    manifest = Manifest.read(ldm_rt_build.out)  # the ONNX build is finished and usable
    assert manifest.tensorrt["status"] == "unavailable"
    assert set(manifest.components["unet"].precisions) == {"fp32", "fp16"}


def test_onnx_only_exits_0(diffusers_build):
    run = diffusers_build.run
    assert run.code == 0, run.stderr
    assert "unet" in run.stdout and "fp16" in run.stdout  # the parity table is printed
    assert Manifest.read(diffusers_build.out).tensorrt["status"] == "skipped"


def test_manifest_is_valid_and_every_hash_verifies(built):
    m = Manifest.read(built.out)
    assert set(m.components) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    for name, entry in m.components.items():
        assert entry.contract.name == name
        for precision, pe in entry.precisions.items():
            assert pe.onnx.file == f"onnx/{precision}/{name}.onnx"
            m.verify_file(built.out, pe.onnx)
    m.verify_file(built.out, m.scheduler)
    m.verify_file(built.out, m.tokenizer)
    assert m.source["kind"] == ("ldm-rt" if built.triton else "diffusers")
    assert len(m.source["sha256"]) == 64
    assert m.profile == ShapeProfile((1, 1, 2), (8, 16, 24), (8, 16, 24))
    assert m.facts.latent_factor == 2 and m.facts.unet_factor == 2 and m.facts.context_dim == 32
    assert {"torch", "onnx", "onnxruntime", "polygraphy"} <= set(m.tools)
    scheduler = json.loads((built.out / "scheduler_config.json").read_text())
    assert scheduler["beta_schedule"] == "scaled_linear"
    # Nothing besides the listed files and the manifest (no temp files left behind).
    listed = {pe.onnx.file for e in m.components.values() for pe in e.precisions.values()}
    listed |= {pe.ort.onnx.file for e in m.components.values() for pe in e.precisions.values() if pe.ort}
    listed |= {m.scheduler.file, m.tokenizer.file, MANIFEST}
    listed |= {m.lora_targets.file}  # where each LoRA-adaptable weight sits in the ONNX files (export/lora_targets.py)
    listed |= {m.preview_factors.file}  # the latent -> RGB map of fast step previews (export/preview_fit.py)
    present = {p.relative_to(built.out).as_posix() for p in built.out.rglob("*") if p.is_file()}
    assert present == listed


def test_a_changed_file_fails_verification(ldm_rt_build, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(ldm_rt_build.out, copy)
    with open(copy / "onnx" / "fp32" / "unet.onnx", "ab") as f:
        f.write(b"\0")
    m = Manifest.read(copy)
    with pytest.raises(ValueError, match="does not match the manifest"):
        m.verify_file(copy, m.components["unet"].precisions["fp32"].onnx)


def test_every_onnx_passes_the_checker_with_the_contract_io(built):
    m = Manifest.read(built.out)
    for name, entry in m.components.items():
        for precision, pe in entry.precisions.items():
            path = built.out / pe.onnx.file
            onnx.checker.check_model(str(path), full_check=True)
            model = onnx.load(str(path))
            assert [i.name for i in model.graph.input] == [t.name for t in entry.contract.inputs]
            assert [o.name for o in model.graph.output] == [t.name for t in entry.contract.outputs]
            # float32 I/O in every precision; fp16 weights inside the fp16 graph.
            float_io = [v for v in [*model.graph.input, *model.graph.output] if v.name != "input_ids"]
            assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in float_io)
            weights = {t.data_type for t in model.graph.initializer if len(t.dims) >= 2}
            expect = onnx.TensorProto.FLOAT16 if precision == "fp16" else onnx.TensorProto.FLOAT
            assert expect in weights, f"{name} {precision}"
            assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17


def test_parity_numbers_are_recorded_and_within_bounds(built):
    m = Manifest.read(built.out)
    for name, entry in m.components.items():
        fp32, fp16 = entry.precisions["fp32"].parity, entry.precisions["fp16"].parity
        for p in (fp32, fp16, fp16["torch_fp16"]):
            assert p["passed"] is True
            assert len(p["shapes"]) == len(p["max_abs_err"]) == len(p["bound"]) >= 3  # min, opt, max, odd
            assert all(e <= b for e, b in zip(p["max_abs_err"], p["bound"]))
        assert max(fp32["max_abs_err"]) < 1e-4, name
        # fp16 genuinely differs from fp32 (the check would notice a precision mix-up) yet stays in bounds.
        assert min(fp16["torch_fp16"]["max_abs_err"]) > 1e-5, name
        assert entry.precisions["fp16"].kept_fp32 == []  # nothing overflows in these tiny models
        profile_max = {d.name: d.max for d in entry.contract.dims}
        for p in (fp32, fp16):  # the profile's maximum fits in memory: checked as it is
            assert p["largest_checked"] == profile_max and "bounded" not in p
        assert len({json.dumps(s) for s in fp32["shapes"]}) == len(fp32["shapes"])  # distinct points


def test_triton_repository_configs_parse(ldm_rt_build):
    m = Manifest.read(ldm_rt_build.out)
    repo = ldm_rt_build.triton
    models = sorted(p.name for p in repo.iterdir() if p.is_dir())
    assert models == sorted(f"{c}{s}" for c in m.components for s in ("", "_fp16"))
    assert sorted(p.name for p in repo.iterdir() if not p.is_dir()) == [MARKER]  # marks the folder as ours
    dtypes = {"float32": model_config_pb2.TYPE_FP32, "int64": model_config_pb2.TYPE_INT64}
    for name in models:
        config = text_format.Parse((repo / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        contract = m.components[name.removesuffix("_fp16")].contract
        assert config.name == name and config.platform == "onnxruntime_onnx" and config.max_batch_size == 0
        assert [t.name for t in config.input] == [t.name for t in contract.inputs]
        assert [t.name for t in config.output] == [t.name for t in contract.outputs]
        for got, spec in zip([*config.input, *config.output], [*contract.inputs, *contract.outputs]):
            assert got.data_type == dtypes[spec.dtype]
            assert list(got.dims) == [s if isinstance(s, int) else -1 for s in spec.shape]
        assert (repo / name / "1" / "model.onnx").is_file()



def test_triton_marker_is_read_bounded_as_a_utf8_json_object(tmp_path):
    """Only a well-formed marker makes a folder ours; any other marker means replacing it is refused."""
    good = json.dumps({"format": MARKER_FORMAT})
    markers = {
        "ours": good.encode(),
        "padded past the bound": (good + " " * MAX_MARKER_BYTES).encode(),  # valid JSON, but too large to read
        "not UTF-8": b'{"format": "ldm-rt-triton-repository", "x": "\xff"}',
        "nested too deep": b"[" * 100_000 + b"]" * 100_000,
        "an array": f"[{good}]".encode(),
        "another format": b'{"format": "someone-else"}',
    }
    for name, data in markers.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / MARKER).write_bytes(data)
        assert is_triton_repository(folder) == (name == "ours"), name
    (tmp_path / "marker is a folder" / MARKER).mkdir(parents=True)
    assert not is_triton_repository(tmp_path / "marker is a folder")
    assert not is_triton_repository(tmp_path / "no marker")

def test_the_reference_accepts_exactly_the_widest_profile_export_builds():
    facts = ModelFacts(4, 8, 8, 4, 4, 77, 768, 49408, None, "kl", 0.18215)  # SD v1's: sizes in steps of 64 px
    widest = unlimited_profile(facts)
    build_module.check_profile_limits(widest)  # the reference's own profile is one export would build
    m, top = facts.pixel_multiple, widest.height[2]
    for wider, flag in [
        (replace(widest, height=(m, m, top + m)), "--height-range"),
        (replace(widest, width=(m, m, top + m)), "--width-range"),
        (replace(widest, batch=(1, 1, widest.batch[2] + 1)), "--batch-range"),
    ]:
        with pytest.raises(ExportError, match=f"the most any model of the SD family can use; choose a smaller maximum \\({flag}\\)"):
            build_module.check_profile_limits(wider)

def test_artifacts_open_in_the_runtime_and_match_the_reference(ldm_rt_build):
    art = Artifacts.open(ldm_rt_build.out)
    contract = art.manifest.components["vae_decoder"].contract
    latent = np.random.default_rng(7).standard_normal((2, 4, 10, 6)).astype(np.float32)  # a shape no check used
    contract.check_inputs({"latent": latent})
    (got,) = ort_session(ldm_rt_build.out / "onnx/fp32/vae_decoder.onnx").run(None, {"latent": latent})
    wrapper = export_wrappers(load_model_folder(ldm_rt_build.model).model)["vae_decoder"]
    with torch.no_grad():
        want = wrapper(torch.from_numpy(latent)).numpy()
    assert got.shape == (2, 3, 20, 12)
    np.testing.assert_allclose(got, want, atol=1e-4)


def _flaky_check_onnx(calls_before_failing: int):
    real = build_module.check_onnx
    calls = {"n": 0}

    def check(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > calls_before_failing:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-build
        return real(*args, **kwargs)

    return check


def test_interrupted_build_leaves_no_finished_looking_folder(ldm_rt_build, tmp_path, monkeypatch):
    monkeypatch.setattr(build_module, "check_onnx", _flaky_check_onnx(0))
    fresh = tmp_path / "fresh"
    assert main(["--model", str(ldm_rt_build.model), "--out", str(fresh), "--onnx-only", *PROFILE]) == 130  # Ctrl-C
    assert not fresh.exists()
    assert list(tmp_path.iterdir()) == []  # the temp folder is gone too

    # Interrupting a rebuild keeps the previous finished folder exactly as it was.
    previous = tmp_path / "previous"
    shutil.copytree(ldm_rt_build.out, previous)
    before = (previous / MANIFEST).read_bytes()
    monkeypatch.setattr(build_module, "check_onnx", _flaky_check_onnx(0))
    assert main(["--model", str(ldm_rt_build.model), "--out", str(previous), "--onnx-only", *PROFILE]) == 130
    assert (previous / MANIFEST).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["previous"]


def _one_line_error(run: Run) -> str:
    """Exit 2 and one error line, the last one on stderr (progress lines of the phases that ran may precede it)."""
    assert run.code == 2, run.stderr
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("build_engines.py: error: ")]
    assert errors == lines[-1:], run.stderr
    return lines[-1]


def test_corrupt_source_is_a_one_line_error(ldm_rt_build, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(ldm_rt_build.model, model)
    unet = model / "unet.safetensors"
    unet.write_bytes(unet.read_bytes()[:1000])  # truncated download
    line = _one_line_error(run_cli(["--model", str(model), "--out", str(tmp_path / "out"), "--onnx-only"]))
    assert "unet.safetensors" in line
    assert not (tmp_path / "out").exists()


def test_missing_source_and_unfit_profile_are_one_line_errors(ldm_rt_build, tmp_path):
    line = _one_line_error(run_cli(["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]))
    assert "does not exist" in line
    # 10 px is not a multiple of the tiny model's latent factor x UNet factor (4).
    args = ["--model", str(ldm_rt_build.model), "--out", str(tmp_path / "out"), "--height-range", "8:10:24"]
    line = _one_line_error(run_cli(args))
    assert "multiple of 4" in line
    assert not (tmp_path / "out").exists()


def test_single_file_needs_a_tokenizer_and_takes_the_prediction_type(diffusers_build, tmp_path):
    single = make_tiny_single_file(diffusers_build.model, tmp_path / "tiny-v1.safetensors", "v1")
    line = _one_line_error(run_cli(["--model", str(single), "--out", str(tmp_path / "out"), "--onnx-only"]))
    assert "tokenizer" in line
    source = load_source(single, tokenizer=diffusers_build.model / "tokenizer", prediction_type="v_prediction")
    assert source.kind == "single_file" and source.name == "tiny-v1"
    assert source.loaded.scheduler_config["prediction_type"] == "v_prediction"
    assert source.facts == Manifest.read(diffusers_build.out).facts  # same model as the diffusers folder


def test_argument_errors_are_one_line_and_exit_2(capsys):
    for bad in (["--height-range", "64:32:128"], ["--batch-range", "1:x:4"], ["--batch", "2"]):  # an unknown option: test_entry_points.py
        with pytest.raises(SystemExit) as e:
            main(bad)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        assert err.startswith("build_engines.py: error: ") and err.rstrip().endswith("see --help")


def test_help_lists_every_flag():
    text = parser().format_help()
    for flag in (
        "--model", "--out", "--fp16", "--onnx-only", "--static-shape", "--batch", "--height", "--width",
        "--batch-range", "--height-range", "--width-range", "--triton-repo", "--tokenizer", "--prediction-type",
        "--refit", "--timing-cache", "--engines", "--parity-memory",
    ):  # fmt: skip
        assert flag in text, flag


def test_engines_are_required_by_engines_or_fp16_without_onnx_only(capsys):
    p = parser()
    required = {
        (): False, ("--onnx-only",): False, ("--fp16", "--onnx-only"): False, ("--fp16",): True, ("--engines",): True,
    }  # fmt: skip
    for flags, expected in required.items():
        assert options_from_args(p.parse_args(list(flags)), p).engines_required is expected, flags
    with pytest.raises(SystemExit) as e:
        main(["--engines", "--onnx-only"])
    assert e.value.code == 2 and "--engines and --onnx-only contradict each other" in capsys.readouterr().err


def test_static_shape_options():
    p = parser()
    options = options_from_args(p.parse_args(["--static-shape", "--batch", "2", "--height", "32"]), p)
    assert options.profile == ShapeProfile.static(2, 32, 64)  # width: OPT of the default range
    assert options.static_shape and options.profile.is_static
    options = options_from_args(p.parse_args(["--height-range", "32"]), p)
    assert options.profile.height == (32, 32, 32) and not options.static_shape
