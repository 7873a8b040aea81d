"""The shipped default model (engines/default): its artifacts are current, portable, small, and reproducible.

This is the CI check that engines/default/artifacts were rebuilt after engines/default/model changed:
the manifest names the sha256 of the weights it was built from, and a rebuild from the shipped checkpoint
with the real CLI gives, component by component, the same outputs as the shipped ONNX on the contract's
sample inputs (runtime/contracts.py) within the contract's fp32 tolerance. Nothing here depends on which
snapshot is shipped: no hashes or pixels are written down.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from ldm_rt.export.parity import sample_sets
from ldm_rt.export.sources import default_model_dir, weights_sha256
from ldm_rt.runtime.artifacts import Artifacts, default_artifacts_dir
from ldm_rt.runtime.manifest import ArtifactError, Manifest

STALE = "shipped artifacts are stale: run `python export/build_engines.py --out engines/default/artifacts` and commit engines/default"
BUDGET_MB = 50.0


def shipped_manifest() -> Manifest:
    """The shipped manifest after checking every file it lists (ONNX included) against its hash."""
    try:
        artifacts = Artifacts.open()  # the default folder; checks the tokenizer and scheduler config
        for entry in artifacts.manifest.components.values():
            for pe in entry.precisions.values():
                artifacts.manifest.verify_file(artifacts.root, pe.onnx)
                if pe.external_data is not None:
                    artifacts.manifest.verify_file(artifacts.root, pe.external_data)
    except ArtifactError as e:
        pytest.fail(f"{STALE} ({e})", pytrace=False)
    return artifacts.manifest


def test_shipped_artifacts_open_and_were_built_from_the_shipped_checkpoint():
    manifest = shipped_manifest()
    assert set(manifest.components) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    if manifest.source.get("sha256") != weights_sha256(default_model_dir()):
        pytest.fail(STALE, pytrace=False)


def test_shipped_artifacts_are_portable_fp32_onnx_only():
    """fp32 ONNX is what the CPU runtime runs; fp16 is not shipped and TensorRT engines are per-GPU builds."""
    manifest = shipped_manifest()
    for name, entry in manifest.components.items():
        assert list(entry.precisions) == ["fp32"], f"{name}: rebuild with `python export/build_engines.py --onnx-only --out engines/default/artifacts`"
        assert not entry.engines, f"{name} has TensorRT engines: rebuild with `python export/build_engines.py --onnx-only --out engines/default/artifacts`"
    assert not (default_artifacts_dir() / "engines").exists()


def test_shipped_sampler_spec_is_current():
    """The manifest's sampler tables are what this runtime's schedulers compute (a new or changed scheduler
    leaves them stale); refreshing them needs no re-export."""
    from ldm_rt.export.build import current_sampler_spec

    artifacts = Artifacts.open()
    assert artifacts.manifest.sampler_spec == current_sampler_spec(artifacts), (
        "the shipped manifest's sampler_spec is stale: run `python -c \"from ldm_rt.export.build import "
        "refresh_sampler_spec; refresh_sampler_spec('engines/default/artifacts')\"` and commit it"
    )


def test_shipped_default_fits_the_size_budget():
    root = default_artifacts_dir().parent
    files = {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()}
    total_mb = sum(files.values()) / 1e6
    listing = ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sorted(files.items(), key=lambda kv: -kv[1]))
    assert total_mb < BUDGET_MB, f"engines/default is {total_mb:.1f} MB (budget {BUDGET_MB} MB): {listing}"


def test_build_engines_without_out_writes_to_the_current_folder_never_into_the_package(tmp_path, monkeypatch):
    import ldm_rt.runtime
    from ldm_rt.export.build import output_dir
    from ldm_rt.export.build_engines import options_from_args, parser

    monkeypatch.chdir(tmp_path)
    package = Path(ldm_rt.runtime.__file__).resolve().parents[1]
    p = parser()
    for argv, expected in ((["--onnx-only"], "default"), (["--model", str(default_model_dir())], "model")):
        out = output_dir(options_from_args(p.parse_args(argv), p))
        assert out == tmp_path / "ldm-rt-artifacts" / expected
        assert package not in out.resolve().parents
    assert options_from_args(p.parse_args(["--out", "x"]), p).out == Path("x")


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory) -> Path:
    """The shipped checkpoint rebuilt by the real command line (ONNX only, default shape profile) into tmp."""
    from ldm_rt.export.build_engines import main

    out = tmp_path_factory.mktemp("default_rebuild") / "artifacts"
    assert main(["--model", str(default_model_dir()), "--out", str(out), "--onnx-only"]) == 0
    return out


def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def test_a_rebuild_reproduces_the_shipped_artifacts(rebuilt):
    shipped, again = shipped_manifest(), Manifest.read(rebuilt)
    assert again.source["sha256"] == shipped.source["sha256"], STALE
    # Everything besides the ONNX bytes that sampling reads must be the same too.
    assert again.facts == shipped.facts, STALE
    assert again.profile == shipped.profile, STALE
    assert again.tokenizer.sha256 == shipped.tokenizer.sha256, f"tokenizer differs: {STALE}"
    assert again.scheduler.sha256 == shipped.scheduler.sha256, f"scheduler config differs: {STALE}"
    assert list(again.components) == list(shipped.components)
    root = default_artifacts_dir()
    for name, entry in shipped.components.items():
        contract = entry.contract
        assert again.components[name].contract == contract, f"{name} contract differs: {STALE}"
        ours = session(root / entry.precisions["fp32"].onnx.file)
        theirs = session(rebuilt / again.components[name].precisions["fp32"].onnx.file)
        out_name = contract.outputs[0].name
        for feeds in sample_sets(contract):  # the contract's sample inputs at min, opt, max and an odd size
            (want,) = ours.run([out_name], feeds)
            (got,) = theirs.run([out_name], feeds)
            err = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
            bound = contract.tolerance["fp32"].bound(want)
            shapes = {k: v.shape for k, v in feeds.items()}
            assert np.all(np.isfinite(want)) and err <= bound, f"{name} at {shapes}: max |err| {err:.3g} > {bound:.3g}; {STALE}"
