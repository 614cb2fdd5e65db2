"""The generator HTTP API in-process (FastAPI TestClient, no Ray): formats, determinism against
`distar generate`, batch-composition invariance, and one 4xx per kind of bad input, naming the field."""
from __future__ import annotations

import base64

import pytest
from fastapi.testclient import TestClient

from distar.cli import main
from distar.images import decode_png
from distar.serving.schemas import MAX_BODY_BYTES
from distar.serving.service import Job
from distar.worlds.digits import files as digits_files

from .serve_fixtures import PROMPT, make_app, service, weights_dir


@pytest.fixture(scope="module")
def client():
    with TestClient(make_app()) as c:
        yield c


@pytest.fixture
def shipped_weights(monkeypatch):
    """`distar generate` reads the shipped weights dir: point it at the one the service loaded."""
    from pathlib import Path

    monkeypatch.setattr(digits_files, "SHIPPED_DIR", Path(weights_dir()))


def _cli_pngs(tmp_path, model: str, prompt: str, n: int, seed: int) -> list[bytes]:
    out = tmp_path / f"{model}-{seed}-{n}"
    assert main(["generate", "--model", model, "--prompt", prompt, "--n", str(n), "--seed", str(seed),
                 "--out", str(out)]) == 0
    return [(out / f"sample_{i:04d}.png").read_bytes() for i in range(n)]


def test_health(client):
    r = client.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "model": "digits-onestep", "reference": "digits-teacher", "device": "cpu",
                        "batching": False, "image_size": [16, 16]}


def test_openapi_comes_from_the_pydantic_models(client):
    spec = client.get("/openapi.json").json()
    req = spec["components"]["schemas"]["GenerateRequest"]
    assert req["additionalProperties"] is False and req["required"] == ["prompt"]
    assert req["properties"]["count"]["maximum"] == 16 and req["properties"]["format"]["enum"] == ["auto", "png", "json"]
    ok = spec["paths"]["/generate"]["post"]["responses"]["200"]["content"]
    assert set(ok) == {"image/png", "application/json"}
    assert {"400", "413", "422"} <= set(spec["paths"]["/generate"]["post"]["responses"])


def test_one_image_is_png_equal_to_distar_generate(client, tmp_path, shipped_weights):
    r = client.post("/generate", json={"prompt": PROMPT, "seed": 11})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-seed"] == "11" and float(r.headers["x-generation-seconds"]) > 0
    assert r.content == _cli_pngs(tmp_path, "digits-onestep", PROMPT, 1, 11)[0]


def test_several_images_are_json_equal_to_distar_generate(client, tmp_path, shipped_weights):
    cli = _cli_pngs(tmp_path, "digits-onestep", PROMPT, 3, 5)
    r = client.post("/generate", json={"prompt": [PROMPT, "the digit seven"], "count": 3, "seed": 5})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["seed"] == 5 and (body["width"], body["height"]) == (16, 16)
    assert [(i["prompt"], i["index"]) for i in body["images"]] == [(p, k) for p in (PROMPT, "the digit seven")
                                                                   for k in range(3)]
    served = [base64.b64decode(i["png_base64"]) for i in body["images"]]
    assert served[:3] == cli                                     # image i of `distar generate --n 3`
    assert [decode_png(b).shape for b in served] == [(1, 16, 16)] * 6
    assert served[3:] != served[:3]                              # the prompt matters


def test_reference_equals_distar_generate_teacher(client, tmp_path, shipped_weights):
    r = client.post("/reference", json={"prompt": PROMPT, "seed": 3})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-model"] == "digits-teacher"
    assert r.content == _cli_pngs(tmp_path, "digits-teacher", PROMPT, 1, 3)[0]


def test_images_do_not_depend_on_what_they_are_batched_with():
    svc = service()
    jobs = [Job((PROMPT,), 5, 1), Job(("the digit seven", "a 0"), 7, 2), Job((PROMPT,), 9, 1), Job(("4",), 1, 9)]
    together = svc.generate(jobs)                                # 29 rows: two padded network calls
    assert together == [svc.generate([j])[0] for j in jobs]
    assert together[0] == together[2][:5]                        # same seed and prompt: same first images
    assert svc.generate([Job((PROMPT,), 1, 2)]) != svc.generate([Job((PROMPT,), 1, 1)])


def test_omitted_seed_is_drawn_and_returned(client):
    r = client.post("/generate", json={"prompt": PROMPT})
    seed = int(r.headers["x-seed"])
    again = client.post("/generate", json={"prompt": PROMPT, "seed": seed})
    assert r.status_code == again.status_code == 200 and r.content == again.content


def test_playground_page(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    for needle in ('id="prompt"', 'id="seed"', 'id="gen-img"', 'id="ref-img"', "X-Generation-Seconds"):
        assert needle in r.text


BAD = [
    ({"prompt": ""}, "prompt"), ({"prompt": "   "}, "prompt"), ({"prompt": "x" * 201}, "prompt"),
    ({"prompt": ["fine", ""]}, "prompt"), ({"prompt": ["a"] * 9}, "prompt"), ({"prompt": 5}, "prompt"),
    ({"prompt": "a\x00b"}, "prompt"), ({}, "prompt"),
    ({"prompt": "3", "count": 0}, "count"), ({"prompt": "3", "count": 17}, "count"),
    ({"prompt": "3", "count": "2"}, "count"), ({"prompt": ["a"] * 4, "count": 9}, "count"),
    ({"prompt": "3", "seed": 1.5}, "seed"), ({"prompt": "3", "seed": "7"}, "seed"),
    ({"prompt": "3", "seed": True}, "seed"), ({"prompt": "3", "seed": -1}, "seed"), ({"prompt": "3", "seed": 2**63}, "seed"),
    ({"prompt": "3", "format": "gif"}, "format"), ({"prompt": "3", "count": 2, "format": "png"}, "format"),
    ({"prompt": "3", "model": "digits-teacher"}, "model"), ({"prompt": "3", "weights_dir": "/etc"}, "weights_dir"),
    ([{"prompt": "3"}], "body"), ("3", "body"),
]


@pytest.mark.parametrize("body,field", BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_bad_request_names_the_field(client, body, field):
    r = client.post("/generate", json=body)
    assert r.status_code == 422, r.text
    msg = r.json()["message"]
    assert msg.startswith(f"{field}:") and r.json()["detail"][0]["field"] == field, msg


def test_malformed_json_is_400(client):
    r = client.post("/generate", content=b'{"prompt": "3",', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["message"].startswith("body: malformed JSON")


def test_oversized_body_is_413(client):
    big = b'{"prompt": "' + b"a" * MAX_BODY_BYTES + b'"}'
    r = client.post("/generate", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["message"].startswith("body:")

    def streamed():  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(MAX_BODY_BYTES // 1000 + 1):
            yield b"a" * 1000
        yield b'"}'

    r = client.post("/generate", content=streamed(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["message"].startswith("body:")


def test_client_cannot_pick_paths_or_models(client, tmp_path):
    target = tmp_path / "written"
    for extra in ({"out": str(target)}, {"model": str(tmp_path)}, {"reference": "digits-teacher"}):
        r = client.post("/generate", json={"prompt": "3", **extra})
        assert r.status_code == 422 and next(iter(extra)) in r.json()["message"]
    assert not target.exists()
    r = client.post("/generate", json={"prompt": "../../etc/passwd", "seed": 1})  # just text to the model
    assert r.status_code == 200 and r.headers["x-model"] == "digits-onestep"


def test_reference_limits_and_absence(client):
    r = client.post("/reference", json={"prompt": "3", "count": 3, "seed": 0})
    assert r.status_code == 422 and r.json()["message"].startswith("count:")
    with TestClient(make_app(reference=False)) as bare:
        r = bare.post("/reference", json={"prompt": "3", "seed": 0})
        assert r.status_code == 404 and r.json()["message"].startswith("reference:")


@pytest.mark.parametrize("argv,flag", [
    (["--model", "no-such-model"], "--model"), (["--reference", "/no/such/dir"], "--reference"),
    (["--port", "0"], "--port"), (["--max-batch-size", "0"], "--max-batch-size"),
    (["--replicas", "0"], "--replicas"), (["--batch-wait-ms", "-5"], "--batch-wait-ms"),
])
def test_distar_serve_refuses_bad_flags_before_starting_ray(capsys, argv, flag):
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"distar serve: error: {flag}") and "Traceback" not in err, err
