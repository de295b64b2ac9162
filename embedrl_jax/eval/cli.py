"""`embedrl eval mmeb | summarize | uvrb` sub-commands (registered by embedrl_jax.cli)."""
from __future__ import annotations

import sys
from pathlib import Path
from ..errors import UserError

__all__ = ["add_parsers", "add_eval"]


def _say(msg: str) -> None:
    print(f"embedrl: {msg}", file=sys.stderr, flush=True)


def _encoder(args):
    from ..infer import _mesh, embedder_encoder

    return embedder_encoder(args.embedder, mesh=_mesh(args.mesh), dtype=args.dtype, dim=args.dim,
                            batch_size=args.batch_size, inputs=args.input)


def run_mmeb(args) -> int:
    from ..infer import _mesh
    from .mmeb import evaluate

    if not Path(args.data_root).is_dir():
        raise FileNotFoundError(f"--data-root {args.data_root}: no such directory")
    if args.tcot and args.reasoner:
        raise UserError("--tcot and --reasoner exclude each other")
    if args.tcot and not Path(args.tcot).is_dir():
        raise FileNotFoundError(f"--tcot {args.tcot}: no such directory")
    encode, tag = _encoder(args)
    reasoner = None
    reasoner_kw = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "seed": args.seed}
    if args.reasoner:
        from ..reason.reasoner import Reasoner

        reasoner = Reasoner.from_pretrained(args.reasoner, mesh=_mesh(args.mesh), dtype=args.dtype)
    meta = {"model_name": Path(args.embedder).name, "model_backbone": "Qwen3-VL",
            "embedding_dimension": str(args.dim or "full"), "data_source": "Self-Reported",
            "ndcg_pairing": "official" if args.official_ndcg_pairing else "correct"}
    out = evaluate(encode, args.data_root, args.out, tasks=args.tasks, model_tag=tag,
                   metadata=meta, tcot_dir=args.tcot, reasoner=reasoner, reasoner_kw=reasoner_kw,
                   skip_missing=args.skip_missing, official_pairing=args.official_ndcg_pairing,
                   mesh=_mesh(args.mesh), log=_say)
    s = out["summary"]["overall"]
    _say(f"eval mmeb: {len(out['records'])} tasks, overall {s['score']:.2f} over {s['tasks']} tasks; "
         f"{out['aggregate']}")
    return 0


def run_summarize(args) -> int:
    from .mmeb import summarize

    out = summarize(args.dir)
    s = out["summary"]["overall"]
    overall = "n/a" if s["score"] is None else f"{s['score']:.2f}"
    _say(f"eval summarize: {s['tasks']} of {s['of']} tasks present; overall {overall}; {out['aggregate']}")
    return 0


def run_uvrb(args) -> int:
    from ..infer import _mesh
    from .uvrb import evaluate_uvrb

    if not Path(args.data_root).is_dir():
        raise FileNotFoundError(f"--data-root {args.data_root}: no such directory")
    encode, tag = _encoder(args)
    datasets = args.datasets.split(",") if args.datasets else None
    s = evaluate_uvrb(encode, args.data_root, args.out, datasets, model_tag=tag, mesh=_mesh(args.mesh), log=_say)
    _say(f"eval uvrb: AVG datasets {s['avg_datasets']:.2f}, AVG abilities {s['avg_abilities']:.2f} "
         f"({s['datasets_present']} of {s['of']} datasets)")
    return 0


def run_toy_set(args) -> int:
    from .toy_set import make_toy_eval_set

    m = make_toy_eval_set(args.dir, n=args.n, seed=args.seed, overwrite=args.overwrite)
    _say(f"toy evaluation set in {args.dir}: MMEB tasks {', '.join(m['tasks'])}; UVRB {args.dir}/uvrb")
    return 0


def _model_args(p):
    p.add_argument("--embedder", required=True, help="Embedder checkpoint (HF or orbax directory)")
    p.add_argument("--data-root", required=True, help="local copy of the benchmark")
    p.add_argument("--out", default="eval_out", help="score files, cache and summary (default eval_out)")
    p.add_argument("--dim", type=int, help="Matryoshka truncation")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--mesh", metavar="D,F,T", help="device mesh (default one device)")
    p.add_argument("--input", action="append", default=[], metavar="KEY=VALUE",
                   help="Embedder input setting (repeatable; the budgets it was trained with), e.g. image_max_tokens=16")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))


def add_parsers(sub) -> None:
    add_eval(sub)


def add_eval(sub) -> None:
    e = sub.add_parser("eval", help="MMEB-V2 / UVRB evaluation with official score files")
    es = e.add_subparsers(dest="eval_verb", required=True)
    m = es.add_parser("mmeb", help="evaluate an Embedder on a local MMEB-V2 copy")
    _model_args(m)
    m.add_argument("--tasks", help="task keys (comma-separated), a modality (image|video|visdoc) or a meta-task; "
                                   "default: every task present under --data-root")
    m.add_argument("--tcot", help="T-CoT folder: <Task>/query.jsonl and <Task>/candidate.jsonl")
    m.add_argument("--reasoner", help="generate the T-CoTs with this Reasoner (kept in OUT/tcot, resumable)")
    m.add_argument("--max-new-tokens", type=int, default=4096)
    m.add_argument("--temperature", type=float, default=1.0)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--skip-missing", action="store_true", help="count and skip queries whose media is missing")
    m.add_argument("--official-ndcg-pairing", action="store_true",
                   help="pair graded qrels as the official code does (set order), not label by label")
    m.set_defaults(run=run_mmeb)
    s = es.add_parser("summarize", help="rebuild aggregate.json and summary from the score files in DIR")
    s.add_argument("dir")
    s.set_defaults(run=run_summarize)
    u = es.add_parser("uvrb", help="evaluate an Embedder on a local UVRB copy")
    _model_args(u)
    u.add_argument("--datasets", help="comma-separated dataset names (default: all present)")
    u.set_defaults(run=run_uvrb)
    t = es.add_parser("toy-set", help="build the bundled toy evaluation set (official layouts, offline)")
    t.add_argument("dir")
    t.add_argument("--n", type=int, default=24, help="queries per task (default 24)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--overwrite", action="store_true")
    t.set_defaults(run=run_toy_set)
