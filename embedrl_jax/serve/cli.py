"""`embedrl serve`: argument parsing and the uvicorn runner (jax is imported only in `run`)."""
from __future__ import annotations

import argparse
import sys
from ..errors import UserError

__all__ = ["add_parser", "run", "serve"]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="OpenAI-compatible /v1/embeddings server (can reason before it embeds)",
        description="Serve the Embedder (and optionally the Reasoner) over HTTP: POST /v1/embeddings in the OpenAI "
                    "schema with dynamic batching, GET /v1/models, /health, /metrics. Every shape the config can "
                    "produce is compiled at start; /health is 503 until then.")
    p.add_argument("--embedder", required=True, metavar="DIR", help="Embedder directory (HF export or orbax)")
    p.add_argument("--reasoner", metavar="DIR", help="Reasoner directory: enables `reasoning: true` requests")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", metavar="K", help="require 'Authorization: Bearer K' on /v1/* (/health, /metrics stay open)")
    p.add_argument("--max-batch-tokens", type=int, metavar="N", help="batch x padded length of one embed batch")
    p.add_argument("--max-queue", type=int, metavar="N", help="items waiting for the model before 429")
    p.add_argument("--max-delay-ms", type=float, metavar="N", help="longest wait for a batch to fill")
    p.add_argument("--allow-local-files", metavar="DIR", help="accept image paths / file:// URLs under DIR")
    p.add_argument("--served-model-name", metavar="NAME", help="model id (default: the Embedder directory's name)")
    p.add_argument("--mesh", metavar="D,F,T", help="mesh sizes data,fsdp,tensor (default: one device)")
    p.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="ServeConfig overrides, e.g. max_seq_len=1024 seq_buckets=[256,512,1024] "
                        "reason.max_new_tokens=256 input.image_max_tokens=512")
    p.set_defaults(run=run)


def config_from_args(args):
    from ..config import apply_overrides
    from .config import ServeConfig

    overrides = list(args.overrides)
    for flag, key in (("max_batch_tokens", "max_batch_tokens"), ("max_queue", "max_queue"),
                      ("max_delay_ms", "max_delay_ms")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    if args.served_model_name:
        overrides.append(f"model_name={args.served_model_name}")
    return apply_overrides(ServeConfig(), overrides)


def build_engine(args, cfg):
    from pathlib import Path

    from ..embed.embedder import Embedder
    from ..reason.reasoner import Reasoner
    from .engine import Engine, reasoner_input_config

    mesh = None
    if args.mesh:
        from ..sharding import MeshConfig, make_mesh

        dims = [int(x) for x in args.mesh.split(",")]
        if len(dims) != 3:
            raise UserError(f"--mesh {args.mesh!r}: expected data,fsdp,tensor")
        mesh = make_mesh(MeshConfig(*dims))
    if args.allow_local_files is not None and not Path(args.allow_local_files).is_dir():
        raise FileNotFoundError(f"--allow-local-files {args.allow_local_files}: no such directory")
    emb = Embedder.from_pretrained(args.embedder, mesh=mesh, dtype=cfg.dtype, input_config=cfg.input)
    rsn = None
    if args.reasoner:
        rsn = Reasoner.from_pretrained(args.reasoner, mesh=mesh, dtype=cfg.dtype,
                                       input_config=reasoner_input_config(cfg.input),
                                       max_prompt_tokens=cfg.reason.max_prompt_tokens)
    name = cfg.model_name or Path(args.embedder).resolve().name
    return Engine(emb, rsn, cfg, model_name=name, allow_local_files=args.allow_local_files)


def serve(app, host: str, port: int, log_level: str = "info") -> None:
    """uvicorn with a SIGTERM/SIGINT hook: /health turns 503 and the queue flushes while uvicorn
    stops accepting and waits for in-flight requests; the lifespan then stops the worker."""
    import uvicorn

    server_state = app.state.server

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            server_state.begin_drain()
            server_state.batcher.close()
            super().handle_exit(sig, frame)
            self._captured_signals.clear()  # a drained shutdown exits 0 instead of re-raising the signal

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=server_state.cfg.drain_timeout_s)
    _Server(config).run()


def run(args) -> int:
    import json
    import logging

    from ..config import to_dict
    from .app import create_app

    cfg = config_from_args(args)
    print(f"embedrl: serve config: {json.dumps(to_dict(cfg))}", file=sys.stderr, flush=True)
    logging.getLogger("embedrl.serve").setLevel(logging.INFO)
    engine = build_engine(args, cfg)
    plans = {"embed": len(engine.embed_plan.shapes())}
    if engine.reason_plan is not None:
        plans["reason"] = len(engine.reason_plan.shapes())
    print(f"embedrl: model {engine.model_name!r} loaded; compiling {plans} shapes before /health turns 200",
          file=sys.stderr, flush=True)
    serve(create_app(engine, api_key=args.api_key), args.host, args.port, args.log_level)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="embedrl")
    add_parser(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
