"""`embedrl serve` as a real uvicorn process on 127.0.0.1: /health 503 -> 200, the openai client,
the API key, /metrics, and SIGTERM draining an in-flight request before a clean exit."""
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from embedrl_jax.data.inputs import InputConfig
from embedrl_jax.embed import Embedder
from embedrl_jax.serve.demo import TINY_INPUT, write_tiny_models

pytestmark = pytest.mark.slow  # a server process: model load + 4 compilations, ~1 min on 2 shared cores

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key"
TEXTS = ["a small test sentence", "the quick brown fox"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_http")
    dirs = write_tiny_models(tmp, reasoner=False)
    port = free_port()
    log = open(tmp / "server.log", "w")
    cmd = [sys.executable, "-m", "embedrl_jax.cli", "serve", "--embedder", str(dirs["embedder"]), "--port", str(port),
           "--api-key", KEY, "--max-delay-ms", "2000", "--served-model-name", "tiny", "--log-level", "warning",
           "max_seq_len=128", "seq_buckets=[128]", "max_batch_items=2", "max_batch_tokens=256", "max_frames=1"]
    cmd += [f"input.{k}={v}" for k, v in TINY_INPUT.items()]
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    seen = []
    try:
        deadline = time.time() + 600
        while True:
            assert proc.poll() is None, (tmp / "server.log").read_text()[-3000:]
            assert time.time() < deadline, "the server did not become healthy"
            try:
                code = httpx.get(base + "/health", timeout=5).status_code
                seen.append(code)
                if code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        yield dict(base=base, proc=proc, dirs=dirs, seen=seen, log=tmp / "server.log")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        log.close()


@pytest.fixture(scope="module")
def ref(server):
    emb = Embedder.from_pretrained(server["dirs"]["embedder"], input_config=InputConfig(**TINY_INPUT))
    return emb.encode([{"text": t} for t in TEXTS])


def test_health_turns_200_after_warm_up(server):
    assert server["seen"][-1] == 200
    assert set(server["seen"]) <= {503, 200}


def test_openai_client_and_curl_style_calls_give_encode_vectors(server, ref):
    import openai

    client = openai.OpenAI(base_url=server["base"] + "/v1", api_key=KEY, max_retries=0, timeout=120)
    resp = client.embeddings.create(model="tiny", input=TEXTS)  # the client asks for base64 and decodes it
    got = np.array([d.embedding for d in resp.data], np.float32)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert resp.usage.prompt_tokens > 0 and [m.id for m in client.models.list().data] == ["tiny"]
    r = httpx.post(server["base"] + "/v1/embeddings", json={"model": "tiny", "input": TEXTS, "encoding_format": "float"},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    np.testing.assert_allclose(np.array([d["embedding"] for d in r.json()["data"]], np.float32), ref, atol=1e-5)
    bad = openai.OpenAI(base_url=server["base"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.embeddings.create(model="tiny", input=TEXTS)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="other", input=TEXTS)
    metrics = httpx.get(server["base"] + "/metrics", timeout=30).text  # open without the key
    assert 'embedrl_requests_total{route="/v1/embeddings",status="401"}' in metrics
    assert "embedrl_compilations_after_warmup 0" in metrics


def test_sigterm_drains_in_flight_requests_then_exits(server, ref):
    proc, out = server["proc"], {}

    def send():  # one item: the batch (capacity 2) would wait up to 2 s for a partner
        out["r"] = httpx.post(server["base"] + "/v1/embeddings", json={"input": [TEXTS[0]]},
                              headers={"Authorization": f"Bearer {KEY}"}, timeout=120)

    t = threading.Thread(target=send)
    t.start()
    time.sleep(0.5)
    assert "r" not in out  # still waiting in the server's queue
    proc.send_signal(signal.SIGTERM)
    t.join(120)
    assert out["r"].status_code == 200, out["r"].text
    np.testing.assert_allclose(out["r"].json()["data"][0]["embedding"], ref[0], atol=1e-5)
    assert proc.wait(120) == 0, server["log"].read_text()[-3000:]
    with pytest.raises(httpx.TransportError):
        httpx.get(server["base"] + "/health", timeout=5)
