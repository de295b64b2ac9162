"""InfoNCE against a numpy loop reference; GradCache against plain full-batch gradients."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from embedrl_jax.embed.losses import embed_in_chunks, grad_cache, info_nce, logit_scale_param
from embedrl_jax.sharding import MeshConfig, make_mesh

# ------------------------------------------------------------------ numpy reference (loops, float64)


def _lse(xs):
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def _argmax(xs):
    best = 0
    for i, x in enumerate(xs):
        if x > xs[best]:
            best = i
    return best


def ref_info_nce(q, p, scale=50.0, hn=None, mask=None):
    """Symmetric InfoNCE, written out row by row and column by column."""
    q, p = np.asarray(q, np.float64), np.asarray(p, np.float64)
    B = q.shape[0]
    negs = []
    if hn is not None:
        hn = np.asarray(hn, np.float64).reshape(-1, q.shape[1])
        valid = np.ones(len(hn), bool) if mask is None else np.asarray(mask, bool).reshape(-1)
        negs = [hn[m] for m in range(len(hn)) if valid[m]]
    dot = lambda a, b: float(sum(x * y for x, y in zip(a, b)))
    S = [[dot(q[i], p[j]) for j in range(B)] for i in range(B)]
    l_q2p = l_p2q = a_q2p = a_p2q = pos = 0.0
    hardest = []
    for i in range(B):
        hsims = [dot(q[i], n) for n in negs]
        row = [scale * S[i][j] for j in range(B)] + [scale * s for s in hsims]
        l_q2p += _lse(row) - scale * S[i][i]
        a_q2p += _argmax(row) == i
        pos += S[i][i]
        cands = [S[i][j] for j in range(B) if j != i] + hsims
        if cands:
            hardest.append(max(cands))
    for j in range(B):
        col = [scale * S[i][j] for i in range(B)]
        l_p2q += _lse(col) - scale * S[j][j]
        a_p2q += _argmax(col) == j
    loss = 0.5 * (l_q2p / B + l_p2q / B)
    metrics = {
        "loss": loss,
        "loss_q2p": l_q2p / B,
        "loss_p2q": l_p2q / B,
        "acc_q2p": a_q2p / B,
        "acc_p2q": a_p2q / B,
        "pos_sim": pos / B,
        "hardest_neg_sim": sum(hardest) / len(hardest) if hardest else -1.0,
        "scale": scale,
    }
    return loss, metrics


def fd_grad(f, x, eps=1e-6):
    """Central finite differences of a float64 scalar function."""
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        g[idx] = (f(xp) - f(xm)) / (2 * eps)
    return g


def unit(seed, shape):
    """Random unit vectors (numpy: no per-op compiles in the test set-up)."""
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return jnp.asarray(x / np.linalg.norm(x, axis=-1, keepdims=True))


def bernoulli(seed, prob, shape):
    return jnp.asarray(np.random.default_rng(seed).random(shape) < prob)


jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
"""Test-time jit: LLVM -O0 halves CPU compile time (compiles dominate this file); the
HLO passes, and so the arithmetic compared below, are those of the default level."""

nce = jit(info_nce)
"""Jitted once per shape: eager op-by-op dispatch costs more compile time than one jit."""


def assert_metrics(got, want, tol=1e-5):
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(float(got[k]), want[k], rtol=tol, atol=tol, err_msg=k)


# ------------------------------------------------------------------ InfoNCE


def test_hand_made_orthonormal_pairs():
    e = jnp.eye(3, dtype=jnp.float32)
    loss, m = nce(e, e)
    assert float(loss) == pytest.approx(math.log1p(2 * math.exp(-50.0)), abs=1e-7)
    assert_metrics(m, ref_info_nce(e, e)[1])
    assert m["acc_q2p"] == 1 and m["acc_p2q"] == 1 and m["pos_sim"] == 1 and m["hardest_neg_sim"] == 0


def test_ties_first_index_wins():
    q = jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    loss, m = nce(q, q)
    want_loss, want = ref_info_nce(q, q)
    assert float(loss) == pytest.approx(want_loss, rel=1e-5, abs=1e-5)  # logits ~50: fp32 ulp 4e-6
    # rows 0 and 1 tie on both columns: argmax picks 0, so row 1 is a miss in both directions
    assert float(m["acc_q2p"]) == pytest.approx(2 / 3) and float(m["acc_p2q"]) == pytest.approx(2 / 3)
    assert_metrics(m, want)


def test_batch_of_one():
    q = unit(0, (1, 4))
    p = unit(1, (1, 4))
    loss, m = nce(q, p)
    assert float(loss) == 0.0 and m["acc_q2p"] == 1 and m["hardest_neg_sim"] == -1.0
    hn = unit(2, (1, 3, 4))
    loss, m = nce(q, p, hard_negatives=hn)
    want_loss, want = ref_info_nce(q, p, hn=hn)
    assert float(loss) > 0
    assert float(loss) == pytest.approx(want_loss, rel=1e-5)
    assert_metrics(m, want)


@pytest.mark.parametrize(
    "B,D,K,masked,scale",
    [(2, 4, 0, False, 50.0), (5, 8, 0, False, 50.0), (6, 16, 3, True, 50.0), (8, 8, 2, False, 20.0), (4, 8, 2, True, 7.5)],
)
def test_random_against_loop_reference(B, D, K, masked, scale):
    seed = B * 100 + D + K
    q, p = unit(seed, (B, D)), unit(seed + 1, (B, D))
    kw = {}
    hn = mask = None
    if K:
        hn = unit(seed + 2, (B, K, D))
        mask = bernoulli(seed + 3, 0.6, (B, K)) if masked else None
        kw = dict(hard_negatives=hn, hard_negative_mask=mask)
    loss, m = jit(functools.partial(info_nce, scale=scale))(q, p, **kw)
    want_loss, want = ref_info_nce(q, p, scale, hn, mask)
    assert float(loss) == pytest.approx(want_loss, rel=1e-5, abs=1e-6)
    assert_metrics(m, want)


def test_flat_hard_negative_pool_and_mask_semantics():
    q, p, hn = unit(30, (4, 8)), unit(31, (4, 8)), unit(32, (4, 2, 8))
    a = nce(q, p, hard_negatives=hn)[0]
    assert float(nce(q, p, hard_negatives=hn.reshape(8, 8))[0]) == pytest.approx(float(a), rel=1e-6)
    # a fully masked pool is no pool, in loss and gradient; masked negatives get no gradient
    none = jnp.zeros((4, 2), bool)
    f = lambda q, p, hn, mask: info_nce(q, p, hard_negatives=hn, hard_negative_mask=mask)[0]
    assert float(jit(f)(q, p, hn, none)) == pytest.approx(float(nce(q, p)[0]), rel=1e-6)
    grad_f = jit(jax.grad(f, argnums=(0, 1, 2)))
    g_masked = grad_f(q, p, hn, none)
    g_plain = jit(jax.grad(lambda q, p: info_nce(q, p)[0], argnums=(0, 1)))(q, p)
    np.testing.assert_allclose(g_masked[0], g_plain[0], atol=1e-6)
    np.testing.assert_allclose(g_masked[1], g_plain[1], atol=1e-6)
    assert not np.any(g_masked[2])
    half = jnp.array([[True, False]] * 4)
    g_half = grad_f(q, p, hn, half)[2]
    assert not np.any(g_half[:, 1]) and np.all(np.any(g_half[:, 0] != 0, axis=-1))
    # scale 0 with masked columns stays finite (mask applied after scaling)
    loss0, m0 = nce(q, p, scale=0.0, hard_negatives=hn, hard_negative_mask=half)
    assert float(loss0) == pytest.approx(0.5 * (math.log(8) + math.log(4)), rel=1e-6)
    assert all(np.isfinite(float(v)) for v in m0.values())


def test_bad_shapes_raise():
    q = jnp.zeros((4, 8))
    with pytest.raises(ValueError, match="equal shapes"):
        info_nce(q, jnp.zeros((3, 8)))
    with pytest.raises(ValueError, match="hard_negatives"):
        info_nce(q, q, hard_negatives=jnp.zeros((4, 2, 7)))
    with pytest.raises(ValueError, match="hard_negative_mask"):
        info_nce(q, q, hard_negatives=jnp.zeros((4, 2, 8)), hard_negative_mask=jnp.ones((4, 3), bool))
    with pytest.raises(ValueError, match="without hard_negatives"):
        info_nce(q, q, hard_negative_mask=jnp.ones((4, 3), bool))


@pytest.mark.parametrize("K,masked", [(0, False), (2, True)])
def test_gradient_matches_finite_differences(K, masked):
    B, D, scale = 4, 6, 10.0
    args = {"q": unit(70, (B, D)), "p": unit(71, (B, D))}
    if K:
        args["hn"] = unit(72, (B, K, D))
    mask = bernoulli(73, 0.5, (B, K)).at[0, 0].set(True) if masked else None

    def f(a):
        return info_nce(a["q"], a["p"], scale=scale, hard_negatives=a.get("hn"), hard_negative_mask=mask)[0]

    got = jit(jax.grad(f))(args)
    for name in args:

        def ref(x, name=name):
            a = dict(args, **{name: x})
            return ref_info_nce(a["q"], a["p"], scale, a.get("hn"), mask)[0]

        np.testing.assert_allclose(got[name], fd_grad(ref, args[name]), rtol=1e-4, atol=2e-6, err_msg=name)
    if masked:
        assert not np.any(np.asarray(got["hn"])[~np.asarray(mask)])


def test_learnable_scale_gradient_and_clip():
    q, p, hn = unit(110, (5, 8)), unit(111, (5, 8)), unit(112, (5, 2, 8))

    def f(log_scale):
        return info_nce(q, p, scale=logit_scale_param(log_scale), hard_negatives=hn)[0]

    log_scale = math.log(20.0)
    grad = jit(jax.grad(f))
    got = float(grad(jnp.float32(log_scale)))
    want = fd_grad(lambda x: ref_info_nce(q, p, math.exp(float(x)), hn)[0], np.float64(log_scale))
    assert got == pytest.approx(float(want), rel=1e-4)
    assert got != 0
    assert float(logit_scale_param(jnp.float32(10.0))) == pytest.approx(100.0)
    assert float(grad(jnp.float32(math.log(150.0)))) == 0.0
    _, m = nce(q, p, scale=logit_scale_param(jnp.float32(log_scale)))
    assert float(m["scale"]) == pytest.approx(20.0, rel=1e-6)


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(MeshConfig(2, 2, 2))


def test_sharded_loss_and_grad_equal_reference(mesh):
    B, D, K = 16, 8, 2
    q, p, hn = unit(50, (B, D)), unit(51, (B, D)), unit(52, (B, K, D))
    mask = bernoulli(53, 0.7, (B, K))
    batch = NamedSharding(mesh, P(("data", "fsdp")))

    def f(q, p, hn, mask):
        return info_nce(q, p, hard_negatives=hn, hard_negative_mask=mask)

    step = jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))
    want = step(q, p, hn, mask)  # single device
    sharded = [jax.device_put(x, batch) for x in (q, p, hn, mask)]
    assert sharded[0].sharding.spec == P(("data", "fsdp"))
    with jax.set_mesh(mesh):
        got = step(*sharded)
    (loss, m), grads = got
    ref_loss, ref_m = ref_info_nce(q, p, 50.0, hn, mask)
    assert float(loss) == pytest.approx(ref_loss, rel=1e-5)
    assert_metrics(m, ref_m)
    for g, w in zip(grads, want[1]):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    assert float(want[0][0]) == pytest.approx(ref_loss, rel=1e-5)


# ------------------------------------------------------------------ GradCache

T, F, H, D, K = 5, 6, 16, 8, 2


def init_params(rs):
    params = {
        "w1": rs.standard_normal((F, H)) / math.sqrt(F),
        "b1": 0.1 * rs.standard_normal((H,)),
        "a": rs.standard_normal((H,)),
        "w2": rs.standard_normal((H, D)) / math.sqrt(H),
    }
    return {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}


def embed(params, batch, key=None):
    """Token MLP, masked attention pooling, projection, L2 normalisation."""
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])  # [b, T, H]
    if key is not None:  # dropout
        h = h * jax.random.bernoulli(key, 0.8, h.shape) / 0.8
    s = jnp.where(batch["mask"], h @ params["a"], -1e9)  # [b, T]
    pooled = jnp.einsum("bt,bth->bh", jax.nn.softmax(s, axis=-1), h)
    e = jax.nn.gelu(pooled @ params["w2"]) + pooled @ params["w2"]
    return e / jnp.linalg.norm(e, axis=-1, keepdims=True)


def make_batch(rs, lead):
    mask = rs.random((*lead, T)) < 0.7
    mask[..., 0] = True
    return {"x": jnp.asarray(rs.standard_normal((*lead, T, F)), jnp.float32), "mask": jnp.asarray(mask)}


def data(B=32, seed=0):
    rs = np.random.default_rng(seed)
    params, qb = init_params(rs), make_batch(rs, (B,))
    # positives are noisy copies of their queries: a softmax that is neither flat nor one-hot
    pb = {"x": qb["x"] + 0.7 * jnp.asarray(rs.standard_normal((B, T, F)), jnp.float32), "mask": qb["mask"]}
    return params, qb, pb, make_batch(rs, (B, K)), jnp.asarray(rs.random((B, K)) < 0.75)


@functools.partial(jit, static_argnames=("with_hn",))
def full_batch(params, qb, pb, nb, nmask, with_hn):
    """Plain global-batch gradient: every activation kept."""

    def loss(params):
        Q, P_ = embed(params, qb), embed(params, pb)
        if not with_hn:
            return info_nce(Q, P_)
        N = embed(params, jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), nb)).reshape(Q.shape[0], K, D)
        return info_nce(Q, P_, hard_negatives=N, hard_negative_mask=nmask)

    (l, m), g = jax.value_and_grad(loss, has_aux=True)(params)
    return l, g, m


@functools.partial(jit, static_argnames=("num_chunks", "with_hn"))
def cached(params, qb, pb, nb, nmask, num_chunks, with_hn):
    if with_hn:
        return grad_cache(embed, params, qb, pb, num_chunks=num_chunks, n_batch=nb, hard_negative_mask=nmask)
    return grad_cache(embed, params, qb, pb, num_chunks=num_chunks)


def rel_err(a, b):
    return max(
        float(jnp.linalg.norm(x - y) / jnp.linalg.norm(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


@pytest.mark.parametrize("with_hn", [False, True])
@pytest.mark.parametrize("num_chunks", [1, 2, 4, 8])
def test_grad_cache_equals_full_batch(num_chunks, with_hn):
    params, qb, pb, nb, nmask = data()
    l_ref, g_ref, m_ref = full_batch(params, qb, pb, nb, nmask, with_hn)
    assert 0 < float(m_ref["acc_q2p"]) < 1  # a mixed softmax: the check means something
    loss, grads, m = cached(params, qb, pb, nb, nmask, num_chunks, with_hn)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert float(loss) == pytest.approx(float(l_ref), rel=1e-5)
    assert rel_err(grads, g_ref) <= 1e-5
    for k in m_ref:
        assert float(m[k]) == pytest.approx(float(m_ref[k]), rel=1e-5, abs=1e-6), k


@pytest.mark.parametrize("with_hn", [False, True])
@pytest.mark.parametrize("num_chunks", [1, 2, 4, 8])
def test_grad_cache_sharded_equals_single_device(mesh, num_chunks, with_hn):
    params, qb, pb, nb, nmask = data()
    loss, grads, m = cached(params, qb, pb, nb, nmask, num_chunks, with_hn)  # single device
    # the same jitted step on the 8-device mesh: batch over (data, fsdp), w1 over tensor
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    s_params = dict(params, w1=jax.device_put(params["w1"], NamedSharding(mesh, P(None, "tensor"))))
    s_args = jax.device_put((qb, pb, nb, nmask), batch)
    assert s_args[0]["x"].sharding.spec == P(("data", "fsdp"))
    with jax.set_mesh(mesh):
        s_loss, s_grads, s_m = cached(s_params, *s_args, num_chunks, with_hn)
    assert len(s_loss.sharding.device_set) == 8
    assert float(s_loss) == pytest.approx(float(loss), rel=1e-5)
    assert rel_err(s_grads, grads) <= 1e-5
    for k in m:
        assert float(s_m[k]) == pytest.approx(float(m[k]), rel=1e-5, abs=1e-6), k


def test_grad_cache_dropout_rng_recomputes_the_same_forward():
    params, qb, pb, nb, nmask = data()
    B, rng, n = 32, jax.random.key(42, impl="rbg"), 4  # rbg: cheaper to compile than threefry

    @jit
    def plain(params):
        """Plain gradient through embed_in_chunks with grad_cache's documented per-chunk keys."""

        def loss(params):
            Q = embed_in_chunks(embed, params, qb, num_chunks=n, rng=jax.random.fold_in(rng, 0))
            P_ = embed_in_chunks(embed, params, pb, num_chunks=n, rng=jax.random.fold_in(rng, 1))
            flat = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), nb)
            N = embed_in_chunks(embed, params, flat, num_chunks=n, rng=jax.random.fold_in(rng, 2))
            return info_nce(Q, P_, hard_negatives=N.reshape(B, K, D), hard_negative_mask=nmask)[0]

        return jax.value_and_grad(loss)(params)

    gc = jit(lambda prm: grad_cache(embed, prm, qb, pb, num_chunks=n, n_batch=nb, rng=rng, hard_negative_mask=nmask))
    l_ref, g_ref = plain(params)
    loss, grads, _ = gc(params)
    assert float(loss) == pytest.approx(float(l_ref), rel=1e-5)
    assert rel_err(grads, g_ref) <= 1e-5
    # dropout is really on: the dropout-free loss differs
    assert abs(float(cached(params, qb, pb, nb, nmask, n, True)[0]) - float(loss)) > 1e-3


def test_grad_cache_learnable_scale_via_loss_params():
    params, qb, pb, _, _ = data(B=16, seed=2)

    def loss_fn(Q, P_, *, log_scale):
        return info_nce(Q, P_, scale=logit_scale_param(log_scale))

    log_scale = jnp.float32(math.log(30.0))
    gc = jit(lambda prm, ls: grad_cache(embed, prm, qb, pb, num_chunks=4, loss_fn=loss_fn, loss_params={"log_scale": ls}))
    loss, (g_params, g_loss), m = gc(params, log_scale)

    def full(prm, ls):
        return loss_fn(embed(prm, qb), embed(prm, pb), log_scale=ls)[0]

    l_ref, (gp_ref, gs_ref) = jit(jax.value_and_grad(full, argnums=(0, 1)))(params, log_scale)
    assert float(loss) == pytest.approx(float(l_ref), rel=1e-5)
    assert rel_err(g_params, gp_ref) <= 1e-5
    assert float(g_loss["log_scale"]) == pytest.approx(float(gs_ref), rel=1e-5)
    assert float(m["scale"]) == pytest.approx(30.0, rel=1e-5)


def test_grad_cache_scans_instead_of_unrolling():
    params, qb, pb, _, _ = data(B=16)

    def n_tanh(num_chunks):
        jaxpr = jax.make_jaxpr(lambda prm: grad_cache(embed, prm, qb, pb, num_chunks=num_chunks))(params)
        return str(jaxpr).count("tanh")

    assert n_tanh(2) == n_tanh(8) == n_tanh(16)


def test_grad_cache_rejects_bad_inputs():
    params, qb, pb, nb, _ = data(B=16)
    with pytest.raises(ValueError, match="not divisible by num_chunks=3"):
        grad_cache(embed, params, qb, pb, num_chunks=3)
    with pytest.raises(ValueError, match="rows"):
        grad_cache(embed, params, qb, jax.tree.map(lambda x: x[:8], pb), num_chunks=2)
    with pytest.raises(ValueError, match="not both"):
        grad_cache(embed, params, qb, pb, num_chunks=2, n_batch=nb, hard_negatives=jnp.zeros((16, K, D)))
