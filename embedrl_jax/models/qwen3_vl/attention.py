"""Attention backends behind one function: `attend`, chosen by the `attention` config key.

`attention` is one of
- "xla": one einsum per row block with fp32 scores, the reference every kernel is tested against
  (its score matrix is quadratic in length: fine on CPU and for short sequences);
- "splash": Pallas splash attention (TPU): flash-style blocks, the score matrix never exists, so
  memory is linear in length. Segment ids and a static causal mask, grouped-query heads, run
  inside `shard_map` over the mesh's batch and head axes. On a CPU target it runs in Pallas
  interpret mode (for tests: slow, and it says so once); a GPU target refuses it;
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")` (GPU) for the one layout cuDNN
  takes (causal, right padding given as sequence lengths); every other layout (left padding,
  packed vision segments, non-causal) uses xla, decided at trace time and logged once;
- "auto": the target platform's kernel (`platform.Target.attention_kernel`): splash on TPU,
  cuDNN on GPU, xla on CPU.

Masks are segment ids (plus causality): a query sees the keys of its own segment. Padding is a
segment of its own (text: attention_mask 0 -> segment 1; vision: segment -1), so no query row is
ever left without a key (a padded query attends to padding, at least itself, and is ignored
downstream); a row without keys would make the softmax undefined in the kernels.
"""
from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from ...errors import ConfigError
from ...sharding import logical_to_spec
from ..platform import Target, platform_of, target_of
from .config import ATTENTION_KINDS
from .inputs import SPLASH_MULTIPLE, Buckets

log = logging.getLogger(__name__)

KINDS = ATTENTION_KINDS
NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)
SPLASH_BLOCKS = (512, 256, 128)  # tried largest first; the block must divide the (padded) length
PAD_SEGMENT = -2  # segment of the positions `attend` itself pads for splash (never a data segment id)

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    """One log line per distinct decision per process: a fallback is never silent, nor repeated
    for every layer and every retrace."""
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def check(attention: str, platform: str) -> None:
    """Refuse, with the reason, an `attention` value the target platform cannot run (build time)."""
    if attention not in KINDS:
        raise ConfigError(f"attention: {attention!r} is not one of {list(KINDS)}")
    if attention == "splash" and platform == "gpu":
        raise ConfigError("attention='splash' is a TPU (Pallas Mosaic) kernel and is refused on a GPU target; "
                          "use attention='cudnn' or 'auto'")
    if attention == "cudnn" and platform != "gpu":
        raise ConfigError(f"attention='cudnn' needs a GPU target, and the target devices are {platform}; "
                          "use attention='auto'")


def resolve(attention: str, target: Target) -> str:
    """The kernel `attention` means on `target` ("auto" -> `Target.attention_kernel`)."""
    check(attention, target.platform)
    return target.attention_kernel if attention == "auto" else attention


def buckets_for(buckets: Buckets, attention: str, mesh) -> Buckets:
    """`buckets` as a model on `mesh` with this `attention` setting pads with them: where it
    resolves to splash, lengths round up to splash's block multiple (`Buckets.for_attention`).
    The one rule behind `load_hf`, `load_orbax`, the trainers and `embedrl plan`."""
    return buckets.for_attention(resolve(attention, target_of(mesh)))


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static (trace-time) facts about a mask that decide which kernel can take it.

    causal: queries see keys at or before their own position (q and k share positions 0..L-1);
    right_padded: every row is one segment 0 prefix followed by padding (segment 1), i.e. the mask
        is given by per-row sequence lengths (what cuDNN accepts). False: any segment layout
        (left padding, packed frames)."""

    causal: bool
    right_padded: bool = False

    def describe(self) -> str:
        kind = "causal" if self.causal else "non-causal"
        return f"{kind} {'right-padded' if self.right_padded else 'segment-id (left-padded or packed)'}"


def attend(q, k, v, q_seg, k_seg, *, layout: Layout, attention: str, target: Target):
    """Grouped-query attention over segment ids, by the kernel `attention` resolves to.

    q [B, N, L, H] heads-first, k/v [B, K, M, H] with N = K * G; q_seg [B, L], k_seg [B, M] int32.
    Returns [B, N, L, H] in q's dtype. Scale 1/sqrt(H); softmax in fp32 in every kernel."""
    kind = resolve(attention, target)
    if kind == "cudnn":
        reason = cudnn_refusal(q, k, layout)
        if reason is None:
            return cudnn_attention(q, k, v, q_seg)
        _warn_once(f"cudnn-fallback:{layout.describe()}:{reason}",
                   f"attention='cudnn': cuDNN cannot take this {layout.describe()} layout ({reason}); it uses xla")
        kind = "xla"
    if kind == "splash":
        # the devices the program runs on (the mesh's, else the default device's), not the target: a
        # CPU-run test may trace the accelerators' path (Target("tpu")) on CPU devices
        interpret = "cpu" in (target.platform, platform_of(jax.sharding.get_abstract_mesh()))
        if interpret:
            _warn_once("splash-interpret", "attention='splash' on CPU devices runs in Pallas interpret mode: exact "
                       "but slow (meant for tests); use 'xla' or 'auto' on CPU")
        return splash_attention(q, k, v, q_seg, k_seg, causal=layout.causal, interpret=interpret)
    q_idx = k_idx = None
    if layout.causal:
        q_idx = jnp.broadcast_to(jnp.arange(q.shape[2], dtype=jnp.int32), q_seg.shape)
        k_idx = jnp.broadcast_to(jnp.arange(k.shape[2], dtype=jnp.int32), k_seg.shape)
    return xla_attention(q, k, v, q_seg, k_seg, q_idx, k_idx, target=target)


# ------------------------------------------------------------------ xla
def xla_attention(q, k, v, q_seg, k_seg, q_idx=None, k_idx=None, *, target: Target):
    """The reference kernel, also decode's (one query against the cache: memory linear in it).

    A query attends to keys of its own segment; with q_idx/k_idx given, only to keys at or before
    it (causal). Scores and softmax in fp32. The target decides how many batch rows go per step
    (`Target.attention_rows`)."""
    b, n, length, h = q.shape
    kv = k.shape[1]
    g = n // kv
    causal = q_idx is not None

    def one(args):
        qr, kr, vr, qs, ks = args[:5]
        mask = qs[:, None] == ks[None, :]
        if causal:
            mask = mask & (args[6][None, :] <= args[5][:, None])
        qr = qr.reshape(kv, g, length, h)
        scores = jnp.einsum("kglh,kmh->kglm", qr, kr, preferred_element_type=jnp.float32) * (h**-0.5)
        scores = jnp.where(mask, scores, NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1).astype(vr.dtype)
        return jnp.einsum("kglm,kmh->kglh", probs, vr).reshape(n, length, h)

    xs = (q, k, v, q_seg, k_seg) + ((q_idx, k_idx) if causal else ())
    return jax.lax.map(one, xs, batch_size=target.attention_rows(b, 4 * n * length * k.shape[2]))


# ------------------------------------------------------------------ splash
def round_up(n: int, multiple: int) -> int:
    return -(-int(n) // multiple) * multiple


def splash_block(length: int) -> int:
    """The largest of `SPLASH_BLOCKS` dividing `length` (a multiple of `SPLASH_MULTIPLE`): big
    blocks amortise the per-block overhead, and a short sequence is one block."""
    return next(b for b in SPLASH_BLOCKS if length % b == 0)


def splash_kernel(heads: int, q_len: int, kv_len: int, causal: bool, interpret: bool):
    """A splash kernel for one (batch row, all local heads). Built inside the trace: its block map
    (computed on the host, cached by splash per mask) becomes constants of the program."""
    bq, bkv = splash_block(q_len), splash_block(kv_len)
    blocks = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                               block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    base = splash.CausalMask((q_len, kv_len)) if causal else splash.FullMask((q_len, kv_len))
    return splash.make_splash_mha(splash.MultiHeadMask([base] * heads), block_sizes=blocks, head_shards=1,
                                  q_seq_shards=1, interpret=interpret)


def _splash_local(q, k, v, q_seg, k_seg, *, causal: bool, interpret: bool):
    """Splash on one shard: vmapped over its batch rows, its heads in one kernel call."""
    _, n, length, h = q.shape
    kernel = splash_kernel(n, length, k.shape[2], causal, interpret)
    q = (q.astype(jnp.float32) * h**-0.5).astype(q.dtype)  # splash does not scale the scores
    run = jax.vmap(lambda a, b, c, s, t: kernel(a, b, c, segment_ids=splash.SegmentIds(s, t)))
    if q.dtype != jnp.float32:
        run = _default_precision(run)
    return run(q, k, v, q_seg, k_seg)


def _default_precision(fn):
    """fn(q, k, v, q_seg, k_seg) whose kernels, forward and backward, are traced at the default
    matmul precision. Mosaic has no fp32-precision matmul of bf16 operands, so a global
    jax_default_matmul_precision="highest" (as the CPU test suite sets) would make a bf16 splash
    program fail to compile; the kernel accumulates in fp32 regardless. The backward kernels are
    traced when the gradient is taken, hence the custom_vjp holding the context there too."""

    @jax.custom_vjp
    def run(q, k, v, q_seg, k_seg):
        with jax.default_matmul_precision("default"):
            return fn(q, k, v, q_seg, k_seg)

    def forward(q, k, v, q_seg, k_seg):
        with jax.default_matmul_precision("default"):
            return jax.vjp(lambda a, b, c: fn(a, b, c, q_seg, k_seg), q, k, v)

    def backward(pullback, grad):
        with jax.default_matmul_precision("default"):
            return (*pullback(grad), None, None)

    run.defvjp(forward, backward)
    return run


def splash_attention(q, k, v, q_seg, k_seg, *, causal: bool, interpret: bool):
    """Splash attention, sharded over the mesh's batch and head axes (no sequence sharding).

    Lengths that are not a multiple of `SPLASH_MULTIPLE` are padded here with a segment of their
    own (the bucket rule avoids it: `Buckets.multiple`). When the mesh shards query heads but cannot
    shard the fewer KV heads alike, K/V are repeated to one per query head so every shard holds the
    KV heads its query heads read."""
    b, n, length, h = q.shape
    m = k.shape[2]
    lp, mp = round_up(length, SPLASH_MULTIPLE), round_up(m, SPLASH_MULTIPLE)
    if lp != length or mp != m:
        pad = lambda x, to: jnp.pad(x, ((0, 0), (0, 0), (0, to - x.shape[2]), (0, 0)))  # noqa: E731
        q, k, v = pad(q, lp), pad(k, mp), pad(v, mp)
        q_seg = jnp.pad(q_seg, ((0, 0), (0, lp - length)), constant_values=PAD_SEGMENT)
        k_seg = jnp.pad(k_seg, ((0, 0), (0, mp - m)), constant_values=PAD_SEGMENT)
    q_seg, k_seg = q_seg.astype(jnp.int32), k_seg.astype(jnp.int32)
    local = functools.partial(_splash_local, causal=causal, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        out = local(q, k, v, q_seg, k_seg)
    else:
        q_spec = logical_to_spec(("batch", "heads", None, None), q.shape, mesh)
        k_spec = logical_to_spec(("batch", "kv_heads", None, None), k.shape, mesh)
        if k_spec[1] != q_spec[1]:
            k, v = (jnp.repeat(x, n // k.shape[1], axis=1) for x in (k, v))
            k_spec = q_spec
        seg_spec = P(q_spec[0], None)
        out = jax.shard_map(local, mesh=mesh, in_specs=(q_spec, k_spec, k_spec, seg_spec, seg_spec),
                            out_specs=q_spec, check_vma=False)(q, k, v, q_seg, k_seg)
    return out[:, :, :length]


# ------------------------------------------------------------------ cuDNN
def cudnn_refusal(q, k, layout: Layout) -> str | None:
    """Why cuDNN's fused attention cannot take this layout (None: it can)."""
    if not layout.causal:
        return "non-causal masks with segments need a bias matrix"
    if not layout.right_padded:
        return "segment ids (left padding, packing) are not sequence lengths"
    if q.shape[2] != k.shape[2]:
        return "query and key lengths differ"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"{q.dtype} operands (its fused kernel takes bfloat16/float16)"
    if q.shape[-1] % 8 or q.shape[-1] > 256:
        return f"head dim {q.shape[-1]} (it takes multiples of 8 up to 256)"
    return None


def cudnn_arguments(q, k, v, q_seg) -> dict:
    """The exact call `cudnn_attention` makes: BTNH arrays, causal, the per-row lengths of a
    right-padded batch (segment 0 prefix) for queries and keys, no bias or mask."""
    lengths = jnp.sum(q_seg == 0, axis=-1).astype(jnp.int32)
    return dict(query=jnp.swapaxes(q, 1, 2), key=jnp.swapaxes(k, 1, 2), value=jnp.swapaxes(v, 1, 2),
                is_causal=True, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                scale=q.shape[-1] ** -0.5, implementation="cudnn")


def cudnn_attention(q, k, v, q_seg, implementation: str = "cudnn"):
    """cuDNN flash attention (GPU) for a causal right-padded batch; heads-first in and out.
    Padded query rows (beyond a row's length) are ignored downstream."""
    args = dict(cudnn_arguments(q, k, v, q_seg), implementation=implementation)
    return jnp.swapaxes(jax.nn.dot_product_attention(**args), 1, 2)

