"""`embedrl selfcheck`: convert a Qwen3-VL checkpoint both ways and check it against transformers.

With no `--hf`, a tiny random Qwen3-VL (and tokenizer) is built offline with transformers'
own classes, so the whole chain runs on a fresh machine: HF -> orbax -> HF (bit-identical),
JAX vs PyTorch logits on real images (scikit-image samples), single device vs the mesh.
With `--hf DIR` the same checks run on a real checkpoint (needs the memory for both
frameworks). Writes WORKDIR/selfcheck.json.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from .fsutil import write_text_atomic


def _say(msg):
    print(f"embedrl: {msg}", file=sys.stderr, flush=True)


def _atomic_json(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2))


def _cases(config, processor):
    from .testing import build_inputs, real_image

    ids = dict(image=config.image_token_id, video=config.video_token_id,
               start=config.vision_start_token_id, end=config.vision_end_token_id)
    kw = dict(processor=processor, token_ids=ids, vocab=config.text_config.vocab_size)
    frames = [real_image(n, (128, 128)) for n in ("astronaut", "coffee", "chelsea", "rocket")]
    return {
        "text": build_inputs([[48]], **kw),
        "one image": build_inputs([[12, ("image", real_image("astronaut", (256, 192))), 20]], **kw),
        "two samples, padded": build_inputs(
            [[6, ("image", real_image("coffee", (192, 128))), 5, ("image", real_image("chelsea", (128, 256))), 9],
             [4, ("image", real_image("rocket", (320, 192))), 3]], padding_side="left", **kw),
        "video": build_inputs([[8, ("video", frames), 6]], **kw),
    }


def run(workdir: str, hf: str | None = None, mesh=None, tol: float = 1e-4) -> dict:
    import jax
    import torch
    from transformers import AutoModelForImageTextToText

    from .checkpoint import load_orbax, save_handle
    from .hf import load_hf, save_hf
    from .safetensors_io import CheckpointReader
    from .sharding import MeshConfig, make_mesh
    from .testing import hf_logits, image_processor, tiny_hf_model, tiny_tokenizer

    jax.config.update("jax_default_matmul_precision", "highest")
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"devices": f"{jax.devices()[0].platform} x{jax.device_count()}"}
    t0 = time.perf_counter()
    if hf is None:
        hf_dir = work / "tiny_hf"
        if not (hf_dir / "config.json").exists():
            _say(f"building a tiny random Qwen3-VL in {hf_dir}")
            tiny_hf_model().save_pretrained(hf_dir)
            tiny_tokenizer().save_pretrained(hf_dir)
            image_processor().save_pretrained(hf_dir)
    else:
        hf_dir = Path(hf)
    ref = AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=torch.float32).eval()
    report["model"] = str(hf_dir)
    report["parameters"] = sum(p.numel() for p in ref.parameters())

    _say("HF -> orbax -> HF")
    handle = load_hf(hf_dir)
    save_handle(work / "orbax", handle, overwrite=True)
    back = save_hf(load_orbax(work / "orbax"), work / "hf_export", overwrite=True)
    src, dst = CheckpointReader(hf_dir), CheckpointReader(back)
    same_keys = set(src.keys()) == set(dst.keys())
    identical = same_keys and all(
        np.asarray(src.get(k)).tobytes() == np.asarray(dst.get(k)).tobytes() for k in src.keys()
    )
    report["round_trip"] = {"same_keys": same_keys, "bit_identical": identical, "tensors": len(list(src.keys()))}

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = (
        Qwen2VLImageProcessorPil.from_pretrained(hf_dir)
        if (hf_dir / "preprocessor_config.json").exists()
        else image_processor()
    )
    mesh = mesh or make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    sharded = load_hf(back, mesh=mesh)
    report["mesh"] = dict(mesh.shape)
    report["parity"] = {}
    for name, inputs in _cases(ref.config, processor).items():
        valid = inputs["attention_mask"].astype(bool)
        want = hf_logits(ref, inputs)
        got = handle.logits(**inputs)
        got_mesh = sharded.logits(**inputs)
        err = float(np.abs(got - want)[valid].max())
        err_mesh = float(np.abs(got_mesh - got)[valid].max())
        report["parity"][name] = {"max_abs_vs_transformers": err, "max_abs_mesh_vs_single": err_mesh}
        _say(f"{name:22s} |jax - transformers| {err:.2e}   |mesh - single| {err_mesh:.2e}")
    report["ok"] = bool(identical and all(
        v["max_abs_vs_transformers"] <= tol and v["max_abs_mesh_vs_single"] <= tol for v in report["parity"].values()
    ))
    report["seconds"] = round(time.perf_counter() - t0, 1)
    _atomic_json(work / "selfcheck.json", report)
    _say(f"round trip bit-identical: {identical}; all checks {'passed' if report['ok'] else 'FAILED'} "
         f"in {report['seconds']}s -> {work / 'selfcheck.json'}")
    return report
