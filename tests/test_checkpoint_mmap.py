"""Pickle checkpoints (.ckpt/.pt/.pth/.bin) are mapped, not read (issue 21): a zip-format file's tensors become the
model's parameters as views of the file, as safetensors' do, so an SD .ckpt (4-7 GB) is never resident whole and
its pages can be given back during the export; a legacy (pre-zip) pickle, which cannot be mapped, still loads."""

from __future__ import annotations

import pytest
import torch
from test_export_memory import _mapped_files, _status_kib
from tiny_models import (  # noqa: F401  (session fixtures)
    make_tiny_controlnet_single_file,
    make_tiny_single_file,
    single_file_state_dict,
    tiny_controlnet_v1,
    tiny_sd_v1,
)

from ldm_rt.export.memory import release_weight_pages
from ldm_rt.reference.checkpoint_errors import CheckpointError
from ldm_rt.reference.checkpoints import load_model, read_state_dict
from ldm_rt.reference.keymap_controlnet import load_controlnet

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_zip_ckpt_loads_as_views_of_its_file(tiny_sd_v1, tmp_path):
    ckpt = make_tiny_single_file(tiny_sd_v1, tmp_path / "tiny.ckpt", "v1")
    loaded = load_model(ckpt, tokenizer=tiny_sd_v1 / "tokenizer")
    assert _mapped_files(loaded.model.parameters()) == {"tiny.ckpt"}
    assert _same_weights(loaded.model, load_model(tiny_sd_v1).model)


def test_a_legacy_pickle_still_loads_read_whole(tiny_sd_v1, tmp_path):
    """torch.save(_use_new_zipfile_serialization=False) files cannot be mapped (torch.load(mmap=True) refuses
    them): they are read into memory as before."""
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": single_file_state_dict(tiny_sd_v1, "v1")}, legacy, _use_new_zipfile_serialization=False)
    loaded = load_model(legacy, tokenizer=tiny_sd_v1 / "tokenizer")
    assert _mapped_files(loaded.model.parameters()) <= {"", "[heap]"}  # anonymous memory: read, not mapped
    assert _same_weights(loaded.model, load_model(tiny_sd_v1).model)


def test_a_zip_controlnet_pth_loads_as_views_of_its_file(tiny_controlnet_v1, tmp_path):
    pth = make_tiny_controlnet_single_file(tiny_controlnet_v1, tmp_path / "control.pth")
    model = load_controlnet(pth)
    assert _mapped_files(model.parameters()) == {"control.pth"}
    assert _same_weights(model, load_controlnet(tiny_controlnet_v1))


def test_mapped_pickle_weights_can_be_given_back_and_come_back_unchanged(tmp_path):
    """release_weight_pages (export/memory.py) drops a mapped checkpoint's resident pages (RssFile falls by their
    size) and they are read again with the same values; nothing is released from a legacy file's copy."""
    w = torch.arange(16 << 20, dtype=torch.float32)
    torch.save({"w": w}, tmp_path / "w.pt")
    torch.save({"w": w}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    mapped = read_state_dict(tmp_path / "w.pt")["w"]
    total = float(mapped.double().sum())  # every page read: resident
    resident = _status_kib("RssFile:")
    assert release_weight_pages([mapped]) >= mapped.nbytes
    assert resident - _status_kib("RssFile:") > 0.8 * mapped.nbytes / 1024
    assert float(mapped.double().sum()) == total
    assert release_weight_pages([read_state_dict(tmp_path / "legacy.pt")["w"]]) == 0


@pytest.mark.parametrize("keep", [0, 100, 0.5], ids=["empty", "zip header only", "half"])
def test_a_truncated_pickle_checkpoint_is_one_line(tiny_sd_v1, tmp_path, keep):
    whole = make_tiny_single_file(tiny_sd_v1, tmp_path / "whole.ckpt", "v1").read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(whole[: int(keep * len(whole)) if isinstance(keep, float) else keep])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt cannot be loaded safely with torch\.load\(weights_only=True\)") as e:
        load_model(cut, tokenizer=tiny_sd_v1 / "tokenizer")
    assert "\n" not in str(e.value)
