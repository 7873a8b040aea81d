"""LoRAs in the HTTP example (examples/http_service): per request from --lora-dir, on top of the service's own
--lora; the pipelines of the last --lora-cache sets kept and reused, the least recently used dropped; bad names,
paths out of the folder, LoRAs for another model and LoRAs without --lora-dir are 422s naming the problem.
In process (FastAPI's TestClient) on the tiny SD v1 artifacts the other LoRA tests share."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from test_lora_formats import write_safetensors
from test_runtime_fixtures import exported, http_example

pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("torch")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from ldm_rt.runtime.lora import LoraTargets  # noqa: E402
from ldm_rt.runtime.pipeline import Pipeline  # noqa: E402

http_app = http_example("ldm_rt_http_example_lora")

BODY = {"prompt": "a red car", "steps": 2, "seed": 4, "height": 16, "width": 16, "scheduler": "ddim", "guidance": 7.5}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_sd_v1):
    return exported(tmp_path_factory, tiny_sd_v1, fp16=True)  # shared with the other LoRA and runtime tests


@pytest.fixture(scope="module")
def lora_dir(artifacts, tmp_path_factory) -> Path:
    """Two kohya LoRAs on different attention projections of the tiny UNet, and one for another model."""
    folder = tmp_path_factory.mktemp("served_loras")
    modules = LoraTargets.read(artifacts).modules["unet"]
    rng = np.random.default_rng(0)
    for name, ending in (("style", "attn1.to_q"), ("detail", "attn2.to_v")):
        module = next(m for m in modules if m.endswith(ending))
        out_dim, in_dim = modules[module].shape
        flat = "lora_unet_" + modules[module].aliases[0].replace(".", "_")
        write_safetensors(folder / f"{name}.safetensors", {
            f"{flat}.lora_down.weight": rng.standard_normal((2, in_dim)), f"{flat}.lora_up.weight": 3 * rng.standard_normal((out_dim, 2)),
        })  # fmt: skip
    write_safetensors(folder / "other_model.safetensors", {
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": rng.standard_normal((4, 1280)),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": rng.standard_normal((5120, 4)),
    })  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def service(artifacts, lora_dir):
    """The app as `app.py --model A --lora-dir D --lora-cache 1` builds it; opens counted."""
    opened: list[list] = []

    def open_pipeline(specs):
        opened.append([(s.path.name, s.scale) for s in specs])
        return Pipeline.load(artifacts, loras=specs)

    pipelines = http_app.LoraPipelines(lora_dir, open_pipeline, size=1)
    client = TestClient(http_app.create_app(Pipeline.load(artifacts), pipelines))
    return client, pipelines, opened


def image_and_params(response) -> tuple[np.ndarray, dict]:
    assert response.status_code == 200, response.text
    with Image.open(io.BytesIO(response.content)) as im:
        return np.asarray(im.convert("RGB")), json.loads(im.text["parameters"])


def test_a_request_applies_its_loras_and_the_set_is_kept(service, artifacts, lora_dir):
    client, pipelines, opened = service
    plain, plain_params = image_and_params(client.post("/generate", json=BODY))
    assert "loras" not in plain_params
    image, params = image_and_params(client.post("/generate", json={**BODY, "loras": [{"name": "style", "scale": 0.5}]}))
    assert [(r["file"], r["scale"], r["applied"]) for r in params["loras"]] == [("style.safetensors", 0.5, "run time")]
    direct = Pipeline.load(artifacts, loras=[(lora_dir / "style.safetensors", 0.5)]).generate(**BODY).images[0]
    np.testing.assert_array_equal(image, direct)
    assert not np.array_equal(image, plain)
    again, _ = image_and_params(client.post("/generate", json={**BODY, "loras": [{"name": "style.safetensors", "scale": 0.5}]}))
    np.testing.assert_array_equal(again, image)
    assert opened == [[("style.safetensors", 0.5)]]  # the second request reused the kept pipeline
    # another set: opened, and with --lora-cache 1 the first one is dropped
    image_and_params(client.post("/generate", json={**BODY, "loras": [{"name": "detail"}, {"name": "style", "scale": 0.5}]}))
    assert pipelines.kept() == [(("detail.safetensors", 1.0), ("style.safetensors", 0.5))]
    assert len(opened) == 2
    health = client.get("/health").json()
    assert health["lora_names"] == ["detail.safetensors", "other_model.safetensors", "style.safetensors"] and health["loras"] == []


@pytest.mark.parametrize("loras, message", [
    ([{"name": "missing"}], "no LoRA named 'missing'"),
    ([{"name": "../style"}], "no LoRA named '../style'"),
    ([{"name": "/etc/passwd"}], "no LoRA named '/etc/passwd'"),
    ([{"name": "other_model"}], "none of its 2 keys names a module of this model"),
])  # fmt: skip
def test_bad_loras_are_422_naming_the_problem(service, loras, message):
    client, _, _ = service
    r = client.post("/generate", json={**BODY, "loras": loras})
    assert r.status_code == 422 and message in r.json()["detail"], r.text


@pytest.mark.parametrize("loras", [
    [{"name": "style"}] * 5,  # more than MAX_REQUEST_LORAS
    [{"name": "style", "scale": "1"}],  # strict types
    [{"name": "style", "scale": 1e9}],
    [{"name": "style", "weight": 1}],  # a misspelt field
])  # fmt: skip
def test_lora_fields_are_validated(service, loras):
    client, _, _ = service
    assert client.post("/generate", json={**BODY, "loras": loras}).status_code == 422


def test_without_a_lora_dir_requests_cannot_name_loras(artifacts):
    client = TestClient(http_app.create_app(Pipeline.load(artifacts)))
    r = client.post("/generate", json={**BODY, "loras": [{"name": "style"}]})
    assert r.status_code == 422 and "started without --lora-dir" in r.json()["detail"]
    assert "lora_names" not in client.get("/health").json()


@pytest.mark.parametrize("args, message", [
    (["--lora", "style.safetensors:lots"], "scale 'lots' is not a number"),
    (["--lora-dir", "/nonexistent-folder"], "is not a folder"),
    (["--lora-cache", "0"], "--lora-cache must be 1..16"),
])  # fmt: skip
def test_bad_lora_options_are_one_line_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        http_app.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0], err
