"""Load test of `embedrl serve` on loopback: open-loop arrivals at fixed rates, text-only and image mixes.

    python benchmarks/serve.py [--workdir runs/bench-serve] [--size tiny|small] [--rates 10,50,200]
                               [--count 200] [--duration 20] [--max-delay-ms 5] [--max-batch-tokens 1024]

For each (mix, rate) the client sends `count` one-item requests (at most `duration` seconds of
arrivals) at Poisson arrival times fixed in advance, and measures each latency from the request's
*scheduled* send time (open loop, so a slow server cannot slow the arrivals down and hide its
queueing). Reported: p50 / p99 / max latency, achieved items/s, errors by class, and the mean
batch size the server formed (from /metrics). Then the same items go through `Embedder.encode`
in this process (server stopped): batched (items/s) and one at a time (latency), so the server's
overhead is a ratio. The models are random (tiny: the test model; small: a 5.2M-parameter
Qwen3-VL with the same tokenizer); nothing here is a test.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("a small test sentence the quick brown fox jumps over the lazy dog retrieval with reasoning an image of "
         "an astronaut coffee cup cat rocket").split()


def small_model(path: Path) -> None:
    """A 5.2M-parameter Qwen3-VL with the tiny tokenizer's ids (random weights)."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from embedrl_jax import testing

    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=testing.VOCAB, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [8, 4, 4],
                                          "mrope_interleaved": True}, tie_word_embeddings=False),
        vision_config=dict(depth=4, hidden_size=128, intermediate_size=256, num_heads=4, patch_size=16,
                           temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=256,
                           num_position_embeddings=256, deepstack_visual_indexes=[1, 2]),
        image_token_id=testing.IMAGE_ID, video_token_id=testing.VIDEO_ID, vision_start_token_id=testing.VSTART,
        vision_end_token_id=testing.VEND, tie_word_embeddings=False)
    torch.manual_seed(0)
    Qwen3VLForConditionalGeneration(cfg).eval().save_pretrained(path)
    tok = testing.tiny_tokenizer()
    tok.add_tokens(["<emb>"])
    tok.save_pretrained(path)
    testing.image_processor().save_pretrained(path)


def build_model(workdir: Path, size: str) -> Path:
    from embedrl_jax.serve.demo import write_tiny_models

    if size == "tiny":
        return write_tiny_models(workdir / "tiny", reasoner=False)["embedder"]
    path = workdir / "small"
    if not (path / "config.json").exists():
        small_model(path)
    return path


def make_items(mix: str, n: int, seed: int = 0):
    """(request items with data: URLs, the same items with PIL images for encode)."""
    from PIL import Image

    from embedrl_jax.testing import real_image

    rng = np.random.default_rng(seed)
    names = ("astronaut", "coffee", "chelsea", "rocket")
    req, lib = [], []
    for i in range(n):
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 24))))
        if mix == "image" and i % 2 == 1:
            w, h = int(rng.integers(48, 160)), int(rng.integers(48, 160))
            img = real_image(names[i % 4], (w, h))
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
            req.append({"text": text, "images": [url]})
            lib.append({"text": text, "images": [Image.open(io.BytesIO(buf.getvalue())).convert("RGB")]})
        else:
            req.append(text)
            lib.append({"text": text})
    return req, lib


def percentile(xs, q):
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def httpx_get(url: str) -> str:
    import httpx

    return httpx.get(url, timeout=30).text


def batch_stats(base: str):
    text = httpx_get(base + "/metrics")
    n = s = 0.0
    for line in text.splitlines():
        m = re.match(r'embedrl_batch_size_(count|sum)\{stage="embed"\} (\S+)', line)
        if m:
            if m.group(1) == "count":
                n = float(m.group(2))
            else:
                s = float(m.group(2))
    return n, s


async def open_loop(base: str, items, rate: float, duration: float, timeout: float, seed: int):
    import httpx

    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=len(items))
    starts = np.cumsum(gaps) - gaps[0]
    keep = starts <= duration
    items, starts = [it for it, k in zip(items, keep) if k], starts[keep]
    lat, errors, done_at = [], {}, []
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(base_url=base, timeout=timeout, limits=limits) as client:
        t0 = time.perf_counter() + 0.2

        async def one(item, at):
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            try:
                r = await client.post("/v1/embeddings", json={"input": [item]})
                cls = str(r.status_code) if r.status_code != 200 else None
            except httpx.TimeoutException:
                cls = "timeout"
            except httpx.TransportError as e:
                cls = type(e).__name__
            end = time.perf_counter()
            if cls is None:
                lat.append(end - (t0 + at))
                done_at.append(end)
            else:
                errors[cls] = errors.get(cls, 0) + 1

        await asyncio.gather(*(one(it, at) for it, at in zip(items, starts)))
    span = (max(done_at) - t0) if done_at else float("nan")
    return dict(sent=len(items), ok=len(lat), p50_ms=1e3 * percentile(lat, 50), p99_ms=1e3 * percentile(lat, 99),
                max_ms=1e3 * max(lat) if lat else float("nan"), items_per_s=len(lat) / span if done_at else 0.0,
                errors=errors)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, args, log_path: Path):
    import httpx

    from embedrl_jax.serve.demo import TINY_INPUT

    port = free_port()
    cmd = [sys.executable, "-m", "embedrl_jax.cli", "serve", "--embedder", str(model), "--port", str(port),
           "--max-delay-ms", str(args.max_delay_ms), "--max-batch-tokens", str(args.max_batch_tokens),
           "--max-queue", str(args.max_queue), "--served-model-name", "bench", "--log-level", "warning",
           f"max_seq_len={args.max_seq_len}", f"seq_buckets={json.dumps(args.seq_buckets)}",
           f"max_batch_items={args.max_batch_items}", "max_frames=1", f"batch_growth={args.batch_growth}"]
    cmd += [f"input.{k}={v}" for k, v in TINY_INPUT.items()]
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log_path.read_text()[-2000:]}")
        if time.time() - t0 > args.startup_timeout:
            proc.kill()
            raise RuntimeError("server did not become healthy")
        try:
            if httpx.get(base + "/health", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    return proc, base, time.time() - t0


def encode_reference(model: Path, items_by_mix: dict, batch_size: int):
    from embedrl_jax.data.inputs import InputConfig
    from embedrl_jax.embed import Embedder
    from embedrl_jax.serve.demo import TINY_INPUT

    emb = Embedder.from_pretrained(model, input_config=InputConfig(**TINY_INPUT))
    out = {}
    for mix, lib in items_by_mix.items():
        emb.encode(lib, batch_size=batch_size, progress=False)  # compile its shapes
        t = time.perf_counter()
        emb.encode(lib, batch_size=batch_size, progress=False)
        batched = len(lib) / (time.perf_counter() - t)
        single = lib[:40]
        for it in single:
            emb.encode([it], progress=False)  # compile
        lat = []
        for it in single:
            t = time.perf_counter()
            emb.encode([it], progress=False)
            lat.append(time.perf_counter() - t)
        out[mix] = dict(items_per_s=batched, single_p50_ms=1e3 * statistics.median(lat))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="runs/bench-serve")
    p.add_argument("--size", choices=("tiny", "small"), default="tiny")
    p.add_argument("--rates", default="10,50,200", help="arrival rates, requests/s")
    p.add_argument("--mixes", default="text,image")
    p.add_argument("--count", type=int, default=200, help="most requests per run")
    p.add_argument("--duration", type=float, default=20.0, help="most seconds of arrivals per run")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout (counted as an error)")
    p.add_argument("--max-delay-ms", type=float, default=5.0)
    p.add_argument("--max-batch-tokens", type=int, default=1024)
    p.add_argument("--max-batch-items", type=int, default=16)
    p.add_argument("--max-queue", type=int, default=256)
    p.add_argument("--batch-growth", type=int, default=2)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--seq-buckets", type=lambda s: [int(x) for x in s.split(",")], default=[128, 256])
    p.add_argument("--startup-timeout", type=float, default=900.0)
    args = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model = build_model(workdir, args.size)
    rates = [float(r) for r in args.rates.split(",")]
    mixes = args.mixes.split(",")
    items = {m: make_items(m, args.count, seed=i) for i, m in enumerate(mixes)}

    proc, base, startup = start_server(model, args, workdir / "server.log")
    print(f"server healthy after {startup:.1f}s (load + warm-up)", flush=True)
    rows = []
    try:
        for mix in mixes:
            for k, rate in enumerate(rates):
                n0, s0 = batch_stats(base)
                res = asyncio.run(open_loop(base, items[mix][0], rate, args.duration, args.timeout, seed=k))
                n1, s1 = batch_stats(base)
                res.update(mix=mix, rate=rate, mean_batch=(s1 - s0) / max(n1 - n0, 1))
                rows.append(res)
                print(json.dumps(res), flush=True)
        metrics = httpx_get(base + "/metrics")
        after = re.search(r"^embedrl_compilations_after_warmup (\S+)$", metrics, re.M)
        compiles_after = float(after.group(1)) if after else float("nan")
        warm = dict(re.findall(r'^embedrl_warmup_shapes\{stage="(\w+)"\} (\S+)$', metrics, re.M))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
    ref = encode_reference(model, {m: items[m][1] for m in mixes}, args.max_batch_items)
    print(json.dumps({"encode": ref}), flush=True)

    head = ("| mix | offered req/s | sent | ok | p50 ms | p99 ms | max ms | items/s | mean batch | errors | "
            "encode items/s (batched) | encode 1-item p50 ms | throughput ratio server/encode | p50 ratio server/encode |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        e = ref[r["mix"]]
        errs = ", ".join(f"{k}: {v}" for k, v in sorted(r["errors"].items())) or "0"
        lines.append(f"| {r['mix']} | {r['rate']:g} | {r['sent']} | {r['ok']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{r['max_ms']:.1f} | {r['items_per_s']:.1f} | {r['mean_batch']:.2f} | {errs} | "
                     f"{e['items_per_s']:.1f} | {e['single_p50_ms']:.1f} | {r['items_per_s'] / e['items_per_s']:.2f} | "
                     f"{r['p50_ms'] / e['single_p50_ms']:.2f} |")
    table = "\n".join(lines)
    settings = (f"model {args.size}, --max-delay-ms {args.max_delay_ms:g}, --max-batch-tokens {args.max_batch_tokens}, "
                f"max_batch_items={args.max_batch_items}, batch_growth={args.batch_growth}, seq_buckets={args.seq_buckets}, --max-queue {args.max_queue}, "
                f"one item per request, Poisson arrivals, {args.count} requests / {args.duration:g}s per run at most; "
                f"server start (load + warm-up of {warm} shapes) {startup:.0f}s; "
                f"compilations after warm-up, read from /metrics at the end: {compiles_after:g}")
    print(settings)
    print(table)
    (workdir / "serve_bench.json").write_text(json.dumps(dict(rows=rows, encode=ref, settings=settings), indent=1))
    (workdir / "serve_bench.md").write_text(settings + "\n\n" + table + "\n")


if __name__ == "__main__":
    main()
