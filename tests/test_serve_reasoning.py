"""The server with a Reasoner, in process: video and reasoning-mode vectors equal the library path
(Reasoner.generate with the method's prompt, then Embedder.encode with the T-CoT), concurrent
requests batched together equal each alone, and no request compiles after warm-up."""
import base64
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from embedrl_jax.config import apply_overrides
from embedrl_jax.embed import Embedder
from embedrl_jax.prompts import load_prompts, reasoner_prompt
from embedrl_jax.reason.reasoner import Reasoner
from embedrl_jax.serve.app import create_app
from embedrl_jax.serve.config import ServeConfig
from embedrl_jax.serve.demo import TINY_OVERRIDES, write_tiny_models
from embedrl_jax.serve.engine import Engine, reasoner_input_config
from embedrl_jax.serve.metrics import CompileCounter
from tiny import real_image

pytestmark = pytest.mark.slow  # warm-up compiles 13 shapes (9 embed, 4 generate): ~1-2 min on 2 shared cores

TOL = 1e-5


def png_url(img) -> str:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    dirs = write_tiny_models(tmp_path_factory.mktemp("serve_reason"))
    cfg = apply_overrides(ServeConfig(), TINY_OVERRIDES + [f"reason.prompts={dirs['prompts']}", "max_delay_ms=20"])
    emb = Embedder.from_pretrained(dirs["embedder"], input_config=cfg.input)
    rsn = Reasoner.from_pretrained(dirs["reasoner"], input_config=reasoner_input_config(cfg.input))
    return cfg, emb, rsn, dirs


@pytest.fixture(scope="module")
def client(setup):
    cfg, emb, rsn, _ = setup
    app = create_app(Engine(emb, rsn, cfg, model_name="tiny"))
    with TestClient(app) as c:
        deadline = time.time() + 900
        while c.get("/health").status_code != 200:
            assert time.time() < deadline, "warm-up did not finish"
            time.sleep(0.2)
        c.server = app.state.server
        yield c


def vectors(resp):
    assert resp.status_code == 200, resp.text
    return np.array([d["embedding"] for d in resp.json()["data"]], np.float32)


def frames():
    return [np.asarray(real_image(n, (64, 64))) for n in ("astronaut", "coffee", "chelsea", "rocket")]


def test_video_vectors_equal_encode(client, setup):
    _, emb, _, _ = setup
    fr = frames()
    got = vectors(client.post("/v1/embeddings", json={"input": [
        {"text": "a video of the lazy dog", "video": [png_url(f) for f in fr]}, "a small test sentence"]}))
    ref = emb.encode([{"text": "a video of the lazy dog", "video": fr}, {"text": "a small test sentence"}])
    np.testing.assert_allclose(got, ref, atol=TOL)


def test_reasoning_vectors_equal_generate_then_encode(client, setup):
    cfg, emb, rsn, dirs = setup
    img = real_image("astronaut", (96, 64))
    items = [{"text": "a small test sentence"}, {"images": [img], "text": "an image of an astronaut"},
             {"text": "retrieval with reasoning"}]
    sides = ["query", "query", "positive"]
    resp = client.post("/v1/embeddings", json={
        "input": [items[0], {"images": [png_url(img)], "text": items[1]["text"]},
                  {"text": items[2]["text"], "input_type": "document"}],
        "reasoning": True, "return_tcot": True})
    got = vectors(resp)
    prompts = load_prompts(dirs["prompts"])
    tcots, refs = [], []
    for item, side in zip(items, sides):
        prompt = reasoner_prompt(item, side, prompts)
        gen = rsn.generate(rsn.prepare([prompt]), n=1, max_new_tokens=cfg.reason.max_new_tokens,
                           temperature=cfg.reason.temperature, seed=cfg.reason.seed)
        tcots.append(gen.texts[0][0])
        refs.append(emb.encode([dict(item, tcot=gen.texts[0][0])])[0])
    assert [d["tcot"] for d in resp.json()["data"]] == tcots
    assert all(tcots)
    np.testing.assert_allclose(got, np.stack(refs), atol=TOL)
    plain = vectors(client.post("/v1/embeddings", json={"input": ["a small test sentence"]}))
    assert np.abs(plain[0] - got[0]).max() > 1e-3  # the T-CoT changed the vector
    usage = resp.json()["usage"]
    assert usage["reasoning_tokens"] > 0 and usage["total_tokens"] == usage["prompt_tokens"] + usage["reasoning_tokens"]


def _batch_stats(client, stage="embed"):
    h = client.server.metrics._hists[("batch_size", (("stage", stage),))]
    return h.n, h.sum


def test_concurrent_requests_batched_together_equal_each_alone(client):
    texts = ["a small test sentence", "the quick brown fox", "an image of an astronaut", "retrieval with reasoning"]
    alone = [vectors(client.post("/v1/embeddings", json={"input": [t]}))[0] for t in texts]
    batcher = client.server.batcher
    batcher.max_delay_s = 30.0  # only a full batch (4 at 128 tokens) runs before this
    n0, s0 = _batch_stats(client)
    out = {}

    def send(i):
        out[i] = client.post("/v1/embeddings", json={"input": [texts[i]]})

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    try:
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert time.perf_counter() - t0 < 30  # they did not wait for the delay: the batch filled
    finally:
        batcher.max_delay_s = 0.02
    n1, s1 = _batch_stats(client)
    assert (n1 - n0, s1 - s0) == (1, 4)  # one batch of four
    for i in range(4):
        np.testing.assert_allclose(vectors(out[i])[0], alone[i], atol=TOL)


def test_compile_count_is_flat_across_a_mixed_stream(client):
    cc = CompileCounter.get()
    before = (cc.lowerings, cc.backend_compiles)
    img = png_url(real_image("coffee", (80, 48)))
    vid = [png_url(f) for f in frames()]
    bodies = [
        {"input": ["a small test sentence"]},
        {"input": ["a", "the quick brown fox jumps over the lazy dog", "retrieval"], "encoding_format": "base64"},
        {"input": [{"images": [img], "text": "x"}, {"images": [img, img]}], "dimensions": 8},
        {"input": [{"video": vid, "text": "v"}]},
        {"input": ["why", {"images": [img], "text": "what is it"}], "reasoning": True},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": img}}]}]},
        {"input": ["x"] * 4},
    ]
    out = []
    threads = [threading.Thread(target=lambda b=b: out.append(client.post("/v1/embeddings", json=b))) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for b in bodies:  # and once more, one after another
        out.append(client.post("/v1/embeddings", json=b))
    assert [r.status_code for r in out] == [200] * (2 * len(bodies)), [r.text for r in out if r.status_code != 200]
    assert (cc.lowerings, cc.backend_compiles) == before
    text = client.get("/metrics").text
    assert "embedrl_compilations_after_warmup" in text
