"""The server in process (Starlette TestClient) on a tiny Embedder with a small shape plan:
vectors equal `Embedder.encode`, base64 / dimensions, every error class, a failing batch, warm-up."""
import base64
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from embedrl_jax.data.inputs import InputConfig
from embedrl_jax.embed import Embedder
from embedrl_jax.serve.app import create_app
from embedrl_jax.serve.config import ServeConfig
from embedrl_jax.serve.demo import TINY_INPUT, write_tiny_models
from embedrl_jax.serve.engine import Engine
from tiny import real_image

pytestmark = pytest.mark.slow  # ~50 s on the shared 2-core machine: tiny model build + 4 compilations

TOL = 1e-5
CFG = InputConfig(**TINY_INPUT)
# 4 shapes: B in {1, 2} x (text, one patch row per item); 128 tokens
SERVE = ServeConfig(input=CFG, max_seq_len=128, seq_buckets=(128,), max_batch_tokens=256, max_batch_items=2,
                    max_frames=1, max_queue=8, max_inputs=4, max_body_bytes=200_000, max_delay_ms=20)


def png_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return write_tiny_models(tmp_path_factory.mktemp("serve"), reasoner=False)


@pytest.fixture(scope="module")
def emb(dirs):
    return Embedder.from_pretrained(dirs["embedder"], input_config=CFG)


@pytest.fixture(scope="module")
def client(emb):
    engine = Engine(emb, None, SERVE, model_name="tiny-embed")
    app = create_app(engine)
    with TestClient(app) as c:
        deadline = time.time() + 600
        while c.get("/health").status_code != 200:
            assert time.time() < deadline, "warm-up did not finish"
            time.sleep(0.2)
        c.server = app.state.server
        yield c


def vectors(resp):
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == list(range(len(body["data"])))
    return np.array([d["embedding"] for d in body["data"]], np.float32)


def test_text_and_image_vectors_equal_encode(client, emb):
    a, b = real_image("astronaut", (96, 64)), real_image("coffee", (64, 64))
    resp = client.post("/v1/embeddings", json={"model": "tiny-embed", "input": [
        "a small test sentence", {"images": [png_url(a)], "text": "an image of an astronaut"},
        {"instruction": "find", "text": "the quick brown fox"}, {"image": png_url(b)}]})
    got = vectors(resp)
    # the reference decodes nothing: PNG is lossless, so the same pixels go in
    ref = emb.encode([{"text": "a small test sentence"}, {"images": [a], "text": "an image of an astronaut"},
                      {"instruction": "find", "text": "the quick brown fox"}, {"images": [b]}])
    assert got.shape == ref.shape == (4, emb.dim)
    np.testing.assert_allclose(got, ref, atol=TOL)
    usage = resp.json()["usage"]
    assert usage["prompt_tokens"] == usage["total_tokens"] > 0
    # vLLM-style messages give the same vector as the item
    msg = client.post("/v1/embeddings", json={"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url(a)}},
                                     {"type": "text", "text": "an image of an astronaut"}]}]})
    np.testing.assert_allclose(vectors(msg)[0], ref[1], atol=TOL)


def test_base64_and_dimensions(client, emb):
    items = ["the quick brown fox jumps over the lazy dog", "retrieval with reasoning"]
    floats = vectors(client.post("/v1/embeddings", json={"input": items}))
    resp = client.post("/v1/embeddings", json={"input": items, "encoding_format": "base64"})
    assert resp.status_code == 200
    dec = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in resp.json()["data"]])
    np.testing.assert_array_equal(dec, floats)
    small = vectors(client.post("/v1/embeddings", json={"input": items, "dimensions": 16}))
    ref = emb.encode([{"text": t} for t in items], dim=16)
    assert small.shape == (2, 16)
    np.testing.assert_allclose(small, ref, atol=TOL)
    np.testing.assert_allclose(np.linalg.norm(small, axis=1), 1.0, atol=1e-5)


def _error(resp, status, param=None, code=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def test_every_error_class(client):
    s = client.server
    ok = png_url(real_image("coffee", (32, 32)))
    post = lambda body, **kw: client.post("/v1/embeddings", json=body, **kw)  # noqa: E731
    # 400: malformed input, naming the field and item
    bad_png = "data:image/png;base64," + base64.b64encode(b"\x89PNG broken").decode()
    err = _error(post({"input": ["fine", {"images": [bad_png], "text": "x"}]}), 400, "input[1].images[0]", "invalid_image")
    assert "input[1].images[0]" in err["message"]
    _error(post({"input": ["fine", ""]}), 400, "input[1].text", "empty_input")
    _error(post({"input": [{"text": "x", "picture": ok}]}), 400, "input[0].picture", "unknown_field")
    _error(post({"input": ["a"], "temperature": 1}), 400, "temperature", "unknown_field")
    _error(post({"input": ["word " * 600]}), 400, "input[0]", "too_many_tokens")  # 480-token text > 128
    _error(post({"input": [{"images": [ok, ok], "text": "x"}]}), 400, "input[0]", "too_many_images")
    _error(post({"input": [{"images": ["/etc/passwd"]}]}), 400, "input[0].images[0]", "local_files_not_allowed")
    _error(post({"input": ["a"], "dimensions": 10_000}), 400, "dimensions")
    _error(post({"input": ["a"], "reasoning": True}), 400, "reasoning", "reasoning_unavailable")
    _error(client.post("/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"}), 400,
           code="invalid_json")
    # 404: unknown model
    _error(post({"model": "gpt-4", "input": ["a"]}), 404, "model", "model_not_found")
    # 413: too many inputs, too large a body
    _error(post({"input": ["a"] * 5}), 413, "input", "too_many_inputs")
    _error(post({"input": ["a" * 250_000]}), 413, code="request_too_large")
    # 429: queue full, at once
    old = s.batcher.max_queue
    s.batcher.max_queue = 1
    try:
        t0 = time.perf_counter()
        _error(post({"input": ["a", "b"]}), 429, code="queue_full")
        assert time.perf_counter() - t0 < 5
    finally:
        s.batcher.max_queue = old
    # 401: missing or wrong key; /health and /metrics stay open
    s.api_key = "sekret"
    try:
        _error(post({"input": ["a"]}), 401, code="missing_api_key")
        _error(post({"input": ["a"]}, headers={"Authorization": "Bearer nope"}), 401, code="invalid_api_key")
        _error(client.get("/v1/models"), 401)
        assert client.get("/health").status_code == 200
        assert client.get("/metrics").status_code == 200
        assert post({"input": ["a"]}, headers={"Authorization": "Bearer sekret"}).status_code == 200
    finally:
        s.api_key = None
    # the server is still serving, and counted the statuses
    assert post({"input": ["still alive"]}).status_code == 200
    text = client.get("/metrics").text
    for status in ("200", "400", "401", "404", "413", "429"):
        assert f'status="{status}"' in text, status


def test_a_failing_batch_fails_only_its_own_requests(client, monkeypatch):
    engine = client.server.engine
    real = engine.run_embed

    def flaky(jobs):
        if jobs[0].kind == "image":
            raise RuntimeError("simulated device failure")
        return real(jobs)

    monkeypatch.setattr(engine, "run_embed", flaky)
    img = png_url(real_image("chelsea", (48, 48)))
    out = {}

    def send(name, body):
        out[name] = client.post("/v1/embeddings", json=body)

    threads = [threading.Thread(target=send, args=("image", {"input": [{"images": [img], "text": "cat"}]})),
               threading.Thread(target=send, args=("text", {"input": ["a small test sentence"]}))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    err = _error(out["image"], 500, code="batch_failed")
    assert "simulated device failure" in err["message"]
    assert out["text"].status_code == 200
    monkeypatch.setattr(engine, "run_embed", real)
    assert client.post("/v1/embeddings", json={"input": [{"images": [img], "text": "cat"}]}).status_code == 200
    assert client.get("/health").status_code == 200


def test_models_health_and_metrics(client, emb):
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == "tiny-embed" and models["data"][0]["embedding_dimensions"] == emb.dim
    text = client.get("/metrics").text
    for name in ("embedrl_request_duration_seconds_bucket", "embedrl_queue_time_seconds_count",
                 "embedrl_batch_size_bucket", "embedrl_batch_tokens_sum", "embedrl_compilations_total",
                 "embedrl_warmup_done 1", 'embedrl_warmup_shapes{stage="embed"} 4'):
        assert name in text, name


def test_health_is_503_until_warm_up_is_done(emb, monkeypatch):
    engine = Engine(emb, None, SERVE, model_name="tiny-embed")
    gate = threading.Event()
    real = engine.warmup
    monkeypatch.setattr(engine, "warmup", lambda: (gate.wait(60), real())[1])
    with TestClient(create_app(engine)) as c:
        h = c.get("/health")
        assert h.status_code == 503 and h.json()["status"] == "warming up"
        _error(c.post("/v1/embeddings", json={"input": ["a"]}), 503, code="warming_up")
        gate.set()
        deadline = time.time() + 300
        while c.get("/health").status_code != 200:
            assert time.time() < deadline
            time.sleep(0.1)
        assert c.post("/v1/embeddings", json={"input": ["a"]}).status_code == 200
