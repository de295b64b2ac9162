"""Server pieces without a model: shape plan, batcher, request schema, media loading, metrics."""
import base64
import io
import threading
import time
from concurrent.futures import Future

import jax
import numpy as np
import pytest
from PIL import Image

from embedrl_jax.serve.batcher import Batcher, Closed, QueueFull
from embedrl_jax.serve.engine import Job, Plan, matryoshka, merge_batches, pad_rows
from embedrl_jax.serve.metrics import CompileCounter, Metrics
from embedrl_jax.serve.schema import APIError, load_image, load_item, parse_request


def _png(size=(20, 12), color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def data_url(size=(20, 12)) -> str:
    return "data:image/png;base64," + base64.b64encode(_png(size)).decode()


# ------------------------------------------------------------------------------------------ plan
def test_plan_shapes_respect_token_budget_and_fit_picks_smallest():
    p = Plan(seqs=(64, 128, 256), max_items=8, max_tokens=512, max_frames=2, row_len=64)
    assert p.batch_sizes(64) == [1, 2, 4, 8]
    assert p.batch_sizes(256) == [1, 2]
    assert p.rows_options(2) == [2, 4]
    shapes = p.shapes()
    assert all(b * s <= 512 for b, s, _ in shapes)
    assert len(shapes) == len(set(shapes))
    assert p.seq_for(65) == 128 and p.seq_for(257) is None
    assert p.fit(3, 128, []) == (4, 0)
    # three 40-patch frames need three 64-patch rows -> 4 (the smallest option >= B=4 that holds them)
    assert p.fit(3, 64, [40, 40, 40]) == (4, 4)
    assert p.fit(1, 64, [20, 20, 20]) == (1, 1)
    with pytest.raises(RuntimeError):
        p.fit(1, 64, [60, 60, 60])


def test_plan_growth_four_and_a_top_that_is_not_a_power():
    p = Plan(seqs=(64,), max_items=16, max_tokens=4096, max_frames=4, row_len=64, growth=4)
    assert p.batch_sizes(64) == [1, 4, 16] and p.rows_options(4) == [4, 16]
    q = Plan(seqs=(64,), max_items=6, max_tokens=4096, max_frames=1, row_len=64)
    assert q.batch_sizes(64) == [1, 2, 4, 6] and q.fit(5, 64, []) == (6, 0)


def test_merge_and_pad_rows_match_a_builder_batch():
    a = {"input_ids": np.array([[1, 2, 3]]), "attention_mask": np.ones((1, 3), int), "mm_token_type_ids": np.zeros((1, 3), int)}
    b = {"input_ids": np.array([[7]]), "attention_mask": np.ones((1, 1), int), "mm_token_type_ids": np.zeros((1, 1), int),
         "pixel_values": np.ones((4, 2), np.float32), "image_grid_thw": np.array([[1, 2, 2]])}
    m = merge_batches([a, b], pad_id=0)
    np.testing.assert_array_equal(m["input_ids"], [[1, 2, 3], [0, 0, 7]])
    np.testing.assert_array_equal(m["attention_mask"], [[1, 1, 1], [0, 0, 1]])
    assert m["pixel_values"].shape == (4, 2) and m["image_grid_thw"].tolist() == [[1, 2, 2]]
    arrays = {"input_ids": m["input_ids"], "attention_mask": m["attention_mask"], "visual_index": -np.ones((2, 3), int),
              "positions": np.arange(18).reshape(3, 2, 3), "patches": np.zeros((1, 4, 2))}
    out = pad_rows(arrays, 4)
    assert out["input_ids"].shape == (4, 3) and out["positions"].shape == (3, 4, 3)
    np.testing.assert_array_equal(out["positions"][:, 3], arrays["positions"][:, 0])
    assert out["patches"].shape == (1, 4, 2)


def test_matryoshka_truncates_and_renormalises():
    v = np.array([[3.0, 4.0, 12.0]], np.float32)
    np.testing.assert_allclose(matryoshka(v, 2), [[0.6, 0.8]], rtol=1e-6)
    assert matryoshka(v, None) is v


# --------------------------------------------------------------------------------------- batcher
class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def job(stage="embed", kind="text", seq=64):
    return Job(stage, kind, 10, seq, {}, Future())


def test_batcher_groups_by_stage_kind_and_bucket_and_flushes_full_groups_first():
    clock = FakeClock()
    bt = Batcher(lambda stage, seq: 2, max_queue=10, max_delay_s=1.0, clock=clock)
    t1, i1, t2, t3 = job(), job(kind="image"), job(), job(seq=128)
    for j in (t1, i1, t2, t3):
        bt.submit([j])
    assert bt.next_batch(timeout=0) == [t1, t2]  # full (capacity 2)
    assert bt.next_batch(timeout=0) is None  # the rest wait for their delay
    clock.t = 1.0
    assert bt.next_batch(timeout=0) == [i1]
    assert bt.next_batch(timeout=0) == [t3]
    assert len(bt) == 0


def test_batcher_queue_full_is_all_or_nothing_and_close_drains():
    bt = Batcher(lambda stage, seq: 8, max_queue=3, max_delay_s=10.0)
    bt.submit([job(), job()])
    with pytest.raises(QueueFull):
        bt.submit([job(), job()])
    assert len(bt) == 2
    bt.submit([job()], force=False)
    bt.submit([job()], force=True)  # a reasoned item's second stage is never refused
    assert len(bt) == 4
    bt.close()
    with pytest.raises(Closed):
        bt.submit([job()])
    assert len(bt.next_batch()) == 4  # draining: no delay
    assert bt.next_batch() is None


def test_batcher_wakes_the_waiting_worker():
    bt = Batcher(lambda stage, seq: 2, max_queue=10, max_delay_s=0.05)
    got = []
    th = threading.Thread(target=lambda: got.append(bt.next_batch(timeout=5)))
    th.start()
    time.sleep(0.05)
    j = job()
    bt.submit([j])
    th.join(5)
    assert got == [[j]]


# ---------------------------------------------------------------------------------------- schema
def test_parse_request_accepts_the_openai_and_item_forms():
    r = parse_request({"model": "m", "input": "hello"}, max_inputs=4)
    assert r.items == [{"text": "hello"}] and r.encoding_format == "float" and r.sides == ["query"]
    r = parse_request({"input": ["a", {"text": "b", "images": ["data:x"], "input_type": "document"}],
                       "input_type": "query", "encoding_format": "base64", "dimensions": 8, "reasoning": True}, max_inputs=4)
    assert r.items[1] == {"text": "b", "images": ["data:x"]} and r.sides == ["query", "positive"]
    assert r.params == ["input[0]", "input[1]"] and r.dimensions == 8 and r.reasoning
    r = parse_request({"messages": [
        {"role": "system", "content": "find the image"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:y"}},
                                     {"type": "text", "text": "a cat"}]}]}, max_inputs=4)
    assert r.items == [{"instruction": "find the image", "text": "a cat", "images": ["data:y"]}]


@pytest.mark.parametrize("body,status,param", [
    ({"input": ["a"], "foo": 1}, 400, "foo"),
    ({"input": [{"text": "a", "imgs": ["x"]}]}, 400, "input[0].imgs"),
    ({"input": ["ok", ""]}, 400, "input[1].text"),
    ({"input": ["ok", {"text": "  "}]}, 400, "input[1].text"),
    ({"input": []}, 400, "input"),
    ({"input": [1, 2, 3]}, 400, "input"),
    ({"input": ["a"], "encoding_format": "int8"}, 400, "encoding_format"),
    ({"input": ["a"], "dimensions": "8"}, 400, "dimensions"),
    ({"input": ["a"], "input_type": "banana"}, 400, "input_type"),
    ({"input": ["a"], "messages": []}, 400, "input"),
    ({"model": "m"}, 400, "input"),
    ({"input": [{"text": 3}]}, 400, "input[0].text"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, 400, "messages[0].role"),
    ({"input": ["a"] * 5}, 413, "input"),
])
def test_parse_request_errors_name_the_field(body, status, param):
    with pytest.raises(APIError) as e:
        parse_request(body, max_inputs=4)
    assert e.value.status == status and e.value.param == param
    assert set(e.value.body()["error"]) == {"message", "type", "param", "code"}


def test_load_image_data_urls_paths_and_refusals(tmp_path):
    img = load_image(data_url((20, 12)), "input[0].images[0]", None)
    assert img.size == (20, 12) and img.mode == "RGB"
    with pytest.raises(APIError, match=r"input\[0\].images\[0\]: cannot decode"):
        load_image("data:image/png;base64," + base64.b64encode(b"not a png").decode(), "input[0].images[0]", None)
    with pytest.raises(APIError, match="invalid base64"):
        load_image("data:image/png;base64,@@@", "p", None)
    with pytest.raises(APIError, match="remote URLs"):
        load_image("https://example.com/x.png", "p", None)
    (tmp_path / "ok.png").write_bytes(_png())
    with pytest.raises(APIError, match="not allowed") as e:
        load_image(str(tmp_path / "ok.png"), "p", None)
    assert e.value.code == "local_files_not_allowed"
    assert load_image(str(tmp_path / "ok.png"), "p", str(tmp_path)).size == (20, 12)
    assert load_image("ok.png", "p", str(tmp_path)).size == (20, 12)
    assert load_image(f"file://{tmp_path}/ok.png", "p", str(tmp_path)).size == (20, 12)
    with pytest.raises(APIError, match="outside"):
        load_image(str(tmp_path / ".." / "x.png"), "p", str(tmp_path))
    with pytest.raises(APIError) as e:
        load_item({"text": "t", "video": [data_url(), "data:image/png;base64,AAAA"]}, "input[3]", None)
    assert e.value.param == "input[3].video[1]" and e.value.status == 400


# --------------------------------------------------------------------------------------- metrics
def test_metrics_render_prometheus_text_and_count_real_compilations():
    cc = CompileCounter.get()
    m = Metrics(cc)
    m.inc("requests_total", status="200", route="/v1/embeddings")
    m.observe("request_duration_seconds", 0.02, route="/v1/embeddings")
    m.observe("request_duration_seconds", 3.0, route="/v1/embeddings")
    text = m.render()
    assert 'embedrl_requests_total{route="/v1/embeddings",status="200"} 1' in text
    assert 'embedrl_request_duration_seconds_bucket{le="0.025",route="/v1/embeddings"} 1' in text
    assert 'embedrl_request_duration_seconds_bucket{le="+Inf",route="/v1/embeddings"} 2' in text
    assert "# TYPE embedrl_request_duration_seconds histogram" in text
    f = jax.jit(lambda x: x * 2 + 1)
    m.mark_warm()
    f(np.ones(3, np.float32))
    assert m.compilations_after_warmup() >= 1
    after = m.compilations_after_warmup()
    f(np.ones(3, np.float32))  # cached: no new compilation
    assert m.compilations_after_warmup() == after
    f(np.ones(5, np.float32))  # a new shape compiles
    assert m.compilations_after_warmup() == after + 1
    assert "embedrl_compilations_after_warmup" in m.render()


# ------------------------------------------------------------------------------ worker settling
class FakeEngine:
    """The engine surface the Server uses, without a model."""

    def __init__(self):
        from embedrl_jax.serve.config import ServeConfig

        self.cfg = ServeConfig()
        self.embed_plan = Plan(seqs=(64,), max_items=4, max_tokens=256, max_frames=1, row_len=64)
        self.warmed = {"embed": 0, "reason": 0}

    def capacity(self, stage, seq):
        return self.embed_plan.capacity(seq)

    def plan(self, stage):
        return self.embed_plan

    def warmup(self):
        return self.warmed

    def run_embed(self, jobs):
        return np.arange(len(jobs) * 3, dtype=np.float32).reshape(len(jobs), 3)


def test_a_cancelled_request_does_not_break_the_worker():
    from embedrl_jax.serve.app import Server

    server = Server(FakeEngine())
    gone, alive = job(), job()
    gone.future.cancel()  # the client went away
    server._run([gone, alive])
    assert alive.future.result(0)["vec"].tolist() == [3.0, 4.0, 5.0]
    assert gone.future.cancelled()
    server.start()
    j = job()
    server.batcher.submit([j])
    assert j.future.result(10)["vec"].shape == (3,)
    server.stop(10)
    assert not server._worker.is_alive()
