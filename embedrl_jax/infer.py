"""Corpus inference: T-CoTs for every item (`tcot generate`), embeddings (`encode`) and top-k
search over them (`search`), each resumable or exact as its command promises.

Items files are JSONL, one Embedder item per line (:mod:`embedrl_jax.data.inputs`) with an optional
``id`` (default: the line number) and ``key``; media paths are relative to ``root`` (default: the
file's folder); ``video`` may be a frame folder (8 frames chosen as MMEB-V2 does).

T-CoT keys follow the official T-CoT files: a query is keyed by its image path and text
(``"<image>||<text>"``, or the text alone), a candidate by its video id, else its image path,
else its text. A T-CoT file is JSONL with ``key`` and ``cot``; rows in the official form
(``qry_img_path``/``qry_text`` or ``pos_image_path``/``pos_text``/``video_id`` with
``query_cot``/``pos_cot``) are keyed the same way.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from .eval.readers import choose_frames
from .errors import UserError

__all__ = ["read_items", "tcot_key", "load_tcots", "attach_tcots", "generate_tcots", "item_fingerprint",
           "KeyedStore", "encode_items_file", "exact_topk", "build_faiss", "search_index", "add_parsers",
           "add_tcot", "add_encode", "add_search"]

SIDES = ("query", "candidate")


# ------------------------------------------------------------------------------------------ items
def _say(msg: str) -> None:
    print(f"embedrl: {msg}", file=sys.stderr, flush=True)


def _atomic_write(path, write: Callable[[Any], None], mode: str = "w") -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_jsonl_atomic(path, rows: Iterable[Mapping]) -> None:
    _atomic_write(path, lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_json_atomic(path, obj, indent: int | None = 4) -> None:
    _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n"))


def read_jsonl(path, *, tolerate_tail: bool = False) -> list[dict]:
    """Rows of a JSONL file; with `tolerate_tail`, a cut last line (a killed writer) is dropped."""
    rows = []
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if tolerate_tail and n == len(lines) - 1:
                break
            raise UserError(f"{path} line {n + 1}: {e}") from None
    return rows


def _resolve(root: str, p: str) -> str:
    return p if os.path.isabs(p) else os.path.join(root, p)


def read_items(path, root: str | None = None) -> tuple[list[str], list[dict]]:
    """(ids, items) of an items JSONL file; media paths resolved against `root` (default: its folder)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"items file {path} does not exist")
    root = os.path.dirname(os.path.abspath(path)) if root is None else root
    ids, items = [], []
    for i, row in enumerate(read_jsonl(path)):
        if not isinstance(row, dict):
            raise UserError(f"{path} line {i + 1}: expected a JSON object")
        item = {k: v for k, v in row.items() if k != "id"}
        if isinstance(item.get("image"), str):
            item["images"] = [item.pop("image")]
        if item.get("images"):
            item["image_paths"] = list(item["images"])
            item["images"] = [_resolve(root, p) for p in item["images"]]
        video = item.get("video")
        if isinstance(video, str):
            folder = _resolve(root, video)
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"{path} line {i + 1}: video frame folder {folder} does not exist")
            item.setdefault("video_id", os.path.basename(video.rstrip("/")))
            item["video"] = choose_frames(folder)
        elif video:
            item["video"] = [_resolve(root, p) for p in video]
        ids.append(str(row.get("id", i)))
        items.append(item)
    return ids, items


def tcot_key(item: Mapping, side: str) -> str:
    """The T-CoT cache key of an item (see the module docstring); an explicit ``key`` wins."""
    if item.get("key"):
        return str(item["key"])
    text = str(item.get("text") or "").strip()
    images = item.get("image_paths") or item.get("images") or []
    image = images[0] if images and isinstance(images[0], str) else ""
    if side == "query":
        return f"{image}||{text}" if image else text
    if item.get("video"):
        vid = item.get("video_id") or os.path.basename(os.path.dirname(str(item["video"][0])))
        return str(vid)
    return image or text


def _official_key(row: Mapping) -> str | None:
    if row.get("key"):
        return str(row["key"])
    if "qry_text" in row or "qry_img_path" in row:
        img, text = (row.get("qry_img_path") or "").strip(), str(row.get("qry_text") or "").strip()
        return f"{img}||{text}" if img else text
    for f in ("video_id", "pos_image_path", "image_path", "pos_text", "text"):
        if row.get(f):
            return str(row[f])
    return None


def load_tcots(path) -> dict[str, str]:
    """key -> T-CoT of a T-CoT file (ours or the official form)."""
    out = {}
    for i, row in enumerate(read_jsonl(path)):
        key = _official_key(row)
        cot = next((row[f] for f in ("cot", "tcot", "query_cot", "pos_cot", "response") if f in row), None)
        if key is None or cot is None:
            raise UserError(f"T-CoT file {path} line {i + 1}: no key or no T-CoT field (fields: {sorted(row)})")
        out[key] = str(cot)
    return out


def attach_tcots(items: Sequence[dict], tcots: Mapping[str, str], side: str, *, source: str) -> tuple[list[dict], int]:
    """Items with their T-CoT (``tcot``) where the key matches; a file matching none is an error."""
    out, hits = [], 0
    for item in items:
        cot = tcots.get(tcot_key(item, side))
        item = dict(item)
        if cot is not None:
            item["tcot"] = cot
            hits += 1
        out.append(item)
    if tcots and items and hits == 0:
        example = tcot_key(items[0], side)
        raise UserError(f"T-CoT cache {source}: none of its {len(tcots)} keys match the {len(items)} {side} items "
                         f"(an item key looks like {example!r}, a file key like {next(iter(tcots))!r})")
    return out, hits


def embed_view(item: Mapping) -> dict:
    """The fields the Embedder reads (drops keys and bookkeeping)."""
    return {k: v for k, v in item.items() if k in ("text", "instruction", "images", "video", "tcot")}


def item_fingerprint(item: Mapping, extra: str = "") -> str:
    """Content hash of what the Embedder sees (text, media paths, T-CoT) plus `extra`."""
    blob = json.dumps(embed_view(item), sort_keys=True, default=str) + "\x00" + extra
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------------ tcot generate
def generate_tcots(reasoner, items: Sequence[Mapping], out_path, *, side: str = "query", n: int = 1,
                   max_new_tokens: int = 4096, temperature: float = 1.0, seed: int = 0, batch_size: int = 8,
                   prompts=None, retrieves_video: bool = False, progress: bool = True) -> dict[str, str]:
    """Write the T-CoT of every item (one per distinct key) to `out_path`, resumably.

    Keys are taken in input order and cut into fixed chunks of `batch_size`; chunk c is sampled
    with key ``fold_in(seed, c)``. Finished chunks are appended to ``out_path.partial`` (one write
    per chunk); a rerun keeps them and does the rest, so a killed run ends with the same file as
    an uninterrupted one, which is written in key order, atomically, at the end.
    """
    import jax

    from .prompts import reasoner_prompt

    if side not in SIDES:
        raise UserError(f"side must be one of {SIDES}, got {side!r}")
    out_path = Path(out_path)
    partial = out_path.with_name(out_path.name + ".partial")
    order: dict[str, Mapping] = {}
    for item in items:
        order.setdefault(tcot_key(item, side), item)
    keys = list(order)
    done: dict[str, dict] = {}
    for f in (out_path, partial):
        if f.exists():
            for row in read_jsonl(f, tolerate_tail=f == partial):
                done[row["key"]] = row
    chunks = [keys[s:s + batch_size] for s in range(0, len(keys), batch_size)]
    todo = [c for c, chunk in enumerate(chunks) if not all(k in done for k in chunk)]
    if done:
        _say(f"tcot generate: {len(keys) - sum(len(chunks[c]) for c in todo)} of {len(keys)} items already done")
    from tqdm.auto import tqdm

    for c in tqdm(todo, desc="tcot", unit="batch", disable=not progress):
        chunk = chunks[c]
        prompt_items = [reasoner_prompt(embed_view(order[k]), "query" if side == "query" else "positive", prompts,
                                        retrieves_video=retrieves_video) for k in chunk]
        batch = reasoner.prepare(prompt_items)
        gen = reasoner.generate(batch, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                                key=jax.random.fold_in(jax.random.key(seed), c))
        rows = []
        for k, texts in zip(chunk, gen.texts):
            row = {"key": k, "side": side, "cot": texts[0]}
            if n > 1:
                row["cots"] = list(texts)
            rows.append(row)
            done[k] = row
        _append_rows(partial, rows)
    write_jsonl_atomic(out_path, [done[k] for k in keys])
    partial.unlink(missing_ok=True)
    return {k: done[k]["cot"] for k in keys}


def _append_rows(path: Path, rows: list[dict]) -> None:
    """One write (and fsync) per finished chunk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------ embeddings
class KeyedStore:
    """Embeddings by item fingerprint in one folder: ``part-*.npz`` files (keys + float32 vectors),
    each written atomically, so a killed run keeps what it finished."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self._vecs: dict[str, np.ndarray] = {}
        if self.folder.is_dir():
            for f in sorted(self.folder.glob("part-*.npz")):
                with np.load(f) as z:
                    for k, v in zip(z["keys"], z["vecs"]):
                        self._vecs[str(k)] = v

    def __contains__(self, key: str) -> bool:
        return key in self._vecs

    def __len__(self) -> int:
        return len(self._vecs)

    def get(self, keys: Sequence[str]) -> np.ndarray:
        return np.stack([self._vecs[k] for k in keys]).astype(np.float32)

    def put(self, keys: Sequence[str], vecs: np.ndarray) -> None:
        if not len(keys):
            return
        vecs = np.asarray(vecs, np.float32)
        _atomic_write(self.folder / f"part-{uuid.uuid4().hex}.npz",
                      lambda f: np.savez(f, keys=np.asarray(list(keys)), vecs=vecs), mode="wb")
        for k, v in zip(keys, vecs):
            self._vecs[k] = v


def encode_cached(encode: Callable[[list[dict]], np.ndarray], items: Sequence[Mapping], store: KeyedStore, *,
                  extra: str = "", chunk: int = 256) -> tuple[np.ndarray, int]:
    """Embeddings of `items` in order, computing only the items the store lacks (in chunks, each
    stored as soon as it is done). Returns (vectors, number computed)."""
    keys = [item_fingerprint(it, extra) for it in items]
    missing: dict[str, dict] = {}
    for k, it in zip(keys, items):
        if k not in store and k not in missing:
            missing[k] = embed_view(it)
    todo = list(missing)
    for s in range(0, len(todo), chunk):
        part = todo[s:s + chunk]
        store.put(part, encode([missing[k] for k in part]))
    if not items:
        return np.zeros((0, 0), np.float32), 0
    return store.get(keys), len(todo)


def encode_items_file(encode: Callable[[list[dict]], np.ndarray], items_path, out_dir, *, tcot=None,
                      side: str = "candidate", root: str | None = None, chunk: int = 64, tag: str = "") -> np.ndarray:
    """`embedrl encode`: ``out_dir/embeddings.npy`` (float32, input order) and ``ids.jsonl``.

    Fixed chunks of the input (chunk c = rows c*chunk ...) are stored under ``out_dir/parts/`` as
    they finish, keyed by the content of their items; a rerun reuses every finished chunk, so an
    interrupted run ends with the array an uninterrupted one writes."""
    ids, items = read_items(items_path, root)
    if tcot is not None:
        items, hits = attach_tcots(items, load_tcots(tcot), side, source=str(tcot))
        _say(f"encode: {hits} of {len(items)} items have a T-CoT")
    out_dir = Path(out_dir)
    parts = out_dir / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    vecs = []
    from tqdm.auto import tqdm

    for c in tqdm(range(0, max(len(items), 1), chunk), desc="encode", unit="chunk", disable=len(items) <= chunk):
        block = items[c:c + chunk]
        if not block:
            break
        digest = hashlib.sha1("".join(item_fingerprint(it, tag) for it in block).encode()).hexdigest()[:16]
        f = parts / f"{c // chunk:06d}-{digest}.npy"
        if f.exists():
            v = np.load(f)
        else:
            v = np.asarray(encode([embed_view(it) for it in block]), np.float32)
            _atomic_write(f, lambda fh: np.save(fh, v), mode="wb")
        vecs.append(v)
    out = np.concatenate(vecs) if vecs else np.zeros((0, 0), np.float32)
    _atomic_write(out_dir / "embeddings.npy", lambda fh: np.save(fh, out), mode="wb")
    write_jsonl_atomic(out_dir / "ids.jsonl", [{"id": i} for i in ids])
    write_json_atomic(out_dir / "encode.json", {"items": os.path.abspath(os.fspath(items_path)), "count": len(ids),
                                                 "dim": int(out.shape[1]) if out.size else 0, "model": tag})
    return out


# ------------------------------------------------------------------------------------------ search
@functools.lru_cache(maxsize=16)
def _topk_fn(mesh, k: int):
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from .sharding import MESH_AXES

    def local(q, c, n_valid):
        scores = jnp.einsum("qd,nd->qn", q, c, precision=jax.lax.Precision.HIGHEST)
        n_local = c.shape[0]
        start = jax.lax.axis_index(MESH_AXES) * n_local
        gidx = start + jnp.arange(n_local)
        scores = jnp.where(gidx[None, :] < n_valid, scores, -jnp.inf)
        vals, idx = jax.lax.top_k(scores, min(k, n_local))
        return vals, (idx + start).astype(jnp.int32)

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(MESH_AXES, None), P()),
                            out_specs=(P(None, MESH_AXES), P(None, MESH_AXES)))

    def run(q, c, n_valid):
        vals, idx = sharded(q, c, n_valid)  # [Q, devices * k_local], blocks in device (= index) order
        best, pos = jax.lax.top_k(vals, k)
        return best, jnp.take_along_axis(idx, pos, axis=1)

    return jax.jit(run)


def exact_topk(queries: np.ndarray, corpus: np.ndarray, k: int, *, mesh=None, query_block: int = 1024):
    """(scores [Q, k], indices [Q, k]) of the k largest q.c, exactly, best first; equal scores
    keep the lower corpus index first. The corpus rows are split over every device of `mesh`
    (default: all devices); each device ranks its block and the per-device top-k are merged,
    so no device holds the whole pool or the whole score matrix."""
    import jax

    from .sharding import MESH_AXES, MeshConfig, make_mesh, to_host

    queries = np.asarray(queries, np.float32)
    corpus = np.asarray(corpus, np.float32)
    n = corpus.shape[0]
    if n == 0:
        raise UserError("the index is empty")
    k = min(int(k), n)
    if mesh is None:
        mesh = make_mesh(MeshConfig(1, -1, 1))
    ndev = int(np.prod([mesh.shape[a] for a in MESH_AXES]))
    per = -(-n // ndev)
    padded = np.zeros((per * ndev, corpus.shape[1]), np.float32)
    padded[:n] = corpus
    from jax.sharding import NamedSharding, PartitionSpec as P

    c = jax.device_put(padded, NamedSharding(mesh, P(MESH_AXES, None)))
    fn = _topk_fn(mesh, k)
    vals, idx = [], []
    for s in range(0, max(len(queries), 1), query_block):
        qb = queries[s:s + query_block]
        if not len(qb):
            break
        rows = len(qb)
        qpad = np.zeros((query_block if len(queries) > query_block else rows, queries.shape[1]), np.float32)
        qpad[:rows] = qb
        with jax.set_mesh(mesh):
            v, i = fn(jax.device_put(qpad, NamedSharding(mesh, P())), c, np.int32(n))
        vals.append(to_host(v)[:rows])  # gathers across hosts in a multi-host run
        idx.append(to_host(i)[:rows])
    if not vals:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return np.concatenate(vals), np.concatenate(idx).astype(np.int64)


def _faiss():
    try:
        import faiss  # noqa: F401
    except ImportError:
        return None
    return faiss


def build_faiss(index_dir) -> bool:
    """Write ``index_dir/index.faiss`` (exact inner-product index) when faiss is installed."""
    faiss = _faiss()
    if faiss is None:
        return False
    vecs = np.ascontiguousarray(np.load(Path(index_dir) / "embeddings.npy"), np.float32)
    index = faiss.IndexFlatIP(vecs.shape[1])
    index.add(vecs)
    tmp = Path(index_dir) / f".index.faiss.tmp-{uuid.uuid4().hex[:8]}"
    faiss.write_index(index, str(tmp))
    os.replace(tmp, Path(index_dir) / "index.faiss")
    return True


def search_index(index_dir, queries: np.ndarray, k: int = 10, *, use_faiss: bool | None = None, mesh=None):
    """(scores, indices, ids) of the top-k corpus rows for each query row: FAISS when its index
    exists (and faiss is installed) unless `use_faiss` is False, else the exact sharded search."""
    index_dir = Path(index_dir)
    ids = [r["id"] for r in read_jsonl(index_dir / "ids.jsonl")]
    faiss = _faiss()
    if use_faiss is None:
        use_faiss = faiss is not None and (index_dir / "index.faiss").exists()
    if use_faiss:
        if faiss is None:
            raise UserError("faiss is not installed (pip install 'embedrl-jax[faiss]')")
        if not (index_dir / "index.faiss").exists():
            build_faiss(index_dir)
        index = faiss.read_index(str(index_dir / "index.faiss"))
        vals, idx = index.search(np.ascontiguousarray(queries, np.float32), min(k, index.ntotal))
        idx = idx.astype(np.int64)
    else:
        vals, idx = exact_topk(queries, np.load(index_dir / "embeddings.npy"), k, mesh=mesh)
    return vals, idx, [[ids[j] for j in row] for row in idx]


# ------------------------------------------------------------------------------------------ CLI
def _model_tag(path) -> str:
    """A name for a model's cache: folder name + hash of its path, size and mtime of its files."""
    path = Path(path).resolve()
    h = hashlib.sha1(str(path).encode())
    for f in sorted(path.rglob("*")):
        if f.is_file() and not f.name.startswith("."):
            st = f.stat()
            h.update(f"{f.relative_to(path)}:{st.st_size}:{int(st.st_mtime)}".encode())
    return f"{path.name}-{h.hexdigest()[:10]}"


def input_config(pairs: Sequence[str] | None):
    """An InputConfig from ``key=value`` strings (pixel budgets, frames, text length as trained)."""
    import dataclasses

    from .data.inputs import InputConfig

    fields = {f.name: f for f in dataclasses.fields(InputConfig)}
    kw = {}
    for p in pairs or ():
        k, sep, v = p.partition("=")
        if not sep or k not in fields:
            raise UserError(f"--input {p!r}: expected key=value with key in {sorted(fields)}")
        default = getattr(InputConfig(), k)
        if v.lower() == "none":
            kw[k] = None
        elif isinstance(default, bool):
            kw[k] = v.lower() in ("1", "true", "yes")
        elif isinstance(default, float):
            kw[k] = float(v)
        elif isinstance(default, int) or default is None:  # None: an optional token count
            kw[k] = int(v)
        else:
            kw[k] = v
    return InputConfig(**kw)


def embedder_encoder(path, *, mesh=None, dtype="float32", dim=None, batch_size=16, inputs: Sequence[str] = ()):
    """(encode function, cache tag) for an Embedder checkpoint; `inputs` are InputConfig overrides
    (use the budgets the model was trained with), part of the cache tag."""
    from .embed.embedder import Embedder

    cfg = input_config(inputs)
    emb = Embedder.from_pretrained(path, mesh=mesh, dtype=dtype, input_config=cfg)
    tag = f"{_model_tag(path)}-{dtype}" + (f"-d{dim}" if dim else "")
    if inputs:
        tag += "-i" + hashlib.sha1(repr(cfg).encode()).hexdigest()[:8]
    return (lambda items: emb.encode(items, batch_size=batch_size, dim=dim)), tag


def _mesh(text):
    from .cli import _make_mesh

    return _make_mesh(text)


def run_tcot_generate(args) -> int:
    from .reason.reasoner import Reasoner

    kw = _overrides(args.overrides, {"temperature": 1.0, "seed": 0, "batch_size": 8})
    _, items = read_items(args.items, args.root)
    reasoner = Reasoner.from_pretrained(args.reasoner, mesh=_mesh(args.mesh), dtype=args.dtype)
    prompts = None
    if args.prompts:
        from .prompts import load_prompts

        prompts = load_prompts(args.prompts)
    out = generate_tcots(reasoner, items, args.out, side=args.side, n=args.n, max_new_tokens=args.max_new_tokens,
                         temperature=float(kw["temperature"]), seed=int(kw["seed"]),
                         batch_size=int(kw["batch_size"]), prompts=prompts, retrieves_video=args.retrieves_video)
    _say(f"tcot generate: {len(out)} T-CoTs in {args.out}")
    return 0


def _overrides(pairs: Sequence[str], defaults: dict) -> dict:
    out = dict(defaults)
    for p in pairs:
        if "=" not in p:
            raise UserError(f"override {p!r}: expected key=value")
        k, v = p.split("=", 1)
        if k not in defaults:
            raise UserError(f"unknown override {k!r} (known: {sorted(defaults)})")
        out[k] = v
    return out


def run_encode(args) -> int:
    encode, tag = embedder_encoder(args.embedder, mesh=_mesh(args.mesh), dtype=args.dtype, dim=args.dim,
                                   batch_size=args.batch_size, inputs=args.input)
    vecs = encode_items_file(encode, args.items, args.out, tcot=args.tcot, side=args.side, root=args.root, tag=tag)
    faiss = build_faiss(args.out) if not args.no_faiss else False
    _say(f"encode: {vecs.shape[0]} x {vecs.shape[1] if vecs.size else 0} float32 in {args.out}"
         + (" (+ index.faiss)" if faiss else ""))
    return 0


def run_search(args) -> int:
    q = Path(args.queries)
    if q.is_dir():
        qvecs = np.load(q / "embeddings.npy")
        qids = [r["id"] for r in read_jsonl(q / "ids.jsonl")]
    elif q.suffix == ".npy":
        qvecs = np.load(q)
        qids = [str(i) for i in range(len(qvecs))]
    else:
        if not args.embedder:
            raise UserError("--queries is an items file: pass --embedder to embed it (or give an encode output folder)")
        encode, _ = embedder_encoder(args.embedder, mesh=_mesh(args.mesh), dtype=args.dtype, dim=args.dim,
                                     inputs=args.input)
        qids, items = read_items(q, args.root)
        if args.tcot:
            items, _ = attach_tcots(items, load_tcots(args.tcot), "query", source=args.tcot)
        qvecs = encode([embed_view(it) for it in items])
    use = False if args.exact else None
    vals, idx, ids = search_index(args.index, qvecs, args.k, use_faiss=use, mesh=_mesh(args.mesh))
    rows = [{"id": qid, "top": [{"id": i, "score": float(s)} for i, s in zip(r, v)]}
            for qid, r, v in zip(qids, ids, vals)]
    if args.out:
        write_jsonl_atomic(args.out, rows)
    else:
        for r in rows:
            print(json.dumps(r))
    return 0


def _common(p, model_flag: str | None = None):
    p.add_argument("--input", action="append", default=[], metavar="KEY=VALUE",
                   help="Embedder input setting (repeatable), e.g. image_max_tokens=16 num_frames=4")
    p.add_argument("--mesh", metavar="D,F,T", help="device mesh (default: one device; -1 takes the rest)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--root", help="folder that relative media paths resolve against (default: the items file's)")


def add_parsers(sub) -> None:
    """Registers `tcot generate`, `encode` and `search` on the CLI's sub-parsers."""
    add_tcot(sub)
    add_encode(sub)
    add_search(sub)


def add_tcot(sub) -> None:
    t = sub.add_parser("tcot", help="T-CoT generation for a corpus")
    ts = t.add_subparsers(dest="tcot_verb", required=True)
    g = ts.add_parser("generate", help="write the T-CoT of every item (resumable)")
    g.add_argument("--reasoner", required=True, help="Reasoner checkpoint (HF or orbax directory)")
    g.add_argument("--items", required=True, help="items JSONL")
    g.add_argument("--out", required=True, help="output JSONL (key, side, cot)")
    g.add_argument("--side", default="query", choices=SIDES)
    g.add_argument("--max-new-tokens", type=int, default=4096)
    g.add_argument("--n", type=int, default=1, help="samples per item (the first is the T-CoT used)")
    g.add_argument("--retrieves-video", action="store_true", help="text queries of a video-retrieval task")
    g.add_argument("--prompts", help="a JSON prompt file merged over the packaged templates")
    _common(g)
    g.add_argument("overrides", nargs="*", metavar="key=value", help="temperature=1.0 seed=0 batch_size=8")
    g.set_defaults(run=run_tcot_generate)


def add_encode(sub) -> None:
    e = sub.add_parser("encode", help="embed an items file (resumable): embeddings.npy + ids.jsonl")
    e.add_argument("--embedder", required=True)
    e.add_argument("--items", required=True)
    e.add_argument("--tcot", help="T-CoT JSONL joined to the items by key")
    e.add_argument("--side", default="candidate", choices=SIDES, help="which key the T-CoT file uses")
    e.add_argument("--dim", type=int, help="Matryoshka truncation (re-normalised)")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--out", required=True)
    e.add_argument("--no-faiss", action="store_true", help="do not write index.faiss even if faiss is installed")
    _common(e)
    e.set_defaults(run=run_encode)


def add_search(sub) -> None:
    s = sub.add_parser("search", help="top-k of queries against an encoded index")
    s.add_argument("--index", required=True, help="an `encode` output folder")
    s.add_argument("--queries", required=True, help="an encode output folder, a .npy, or an items JSONL (with --embedder)")
    s.add_argument("--embedder")
    s.add_argument("--tcot", help="query T-CoT JSONL (items file queries)")
    s.add_argument("--dim", type=int)
    s.add_argument("--k", type=int, default=10)
    s.add_argument("--exact", action="store_true", help="exact sharded search even when index.faiss exists")
    s.add_argument("--out", help="JSONL of {id, top: [{id, score}]} (default: stdout)")
    _common(s)
    s.set_defaults(run=run_search)
