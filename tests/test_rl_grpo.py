"""GRPO pieces against direct numpy loop implementations of the formulas."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedrl_jax.rl import grpo
from embedrl_jax.rl import group_advantages, grpo_loss, lookup, register, token_logprobs

AGGREGATIONS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum-norm"]


# ------------------------------------------------------------------ numpy references (loops)


def ref_advantages(rewards, group_size, normalize_std=True):
    rewards = [float(x) for x in rewards]
    out = []
    for g in range(len(rewards) // group_size):
        block = rewards[g * group_size : (g + 1) * group_size]
        mean = sum(block) / group_size
        std = math.sqrt(sum((x - mean) ** 2 for x in block) / (group_size - 1)) if group_size > 1 else 0.0
        for x in block:
            out.append((x - mean) / (std + 1e-6) if normalize_std else x - mean)
    return np.array(out)


def ref_grpo(logp, old, ref, adv, mask, clip_low=0.2, clip_high=0.2, dual_clip=3.0, kl_coef=0.01, aggregation="token-mean"):
    B, T = mask.shape
    tok = np.zeros((B, T))
    pg_tok = np.zeros((B, T))
    kl_tok = np.zeros((B, T))
    n_tok = clipped = ratio_sum = 0.0
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            a = float(adv[b])
            ratio = math.exp(min(max(float(logp[b, t]) - float(old[b, t]), -20.0), 20.0))
            unc = -a * ratio
            clp = -a * min(max(ratio, 1 - clip_low), 1 + clip_high)
            pg = max(unc, clp)
            if dual_clip is not None and a < 0:
                pg = min(pg, -a * dual_clip)
            kl = 0.0
            if kl_coef != 0:
                d = min(max(float(ref[b, t]) - float(logp[b, t]), -20.0), 20.0)
                kl = math.exp(d) - d - 1
            pg_tok[b, t], kl_tok[b, t], tok[b, t] = pg, kl, pg + kl_coef * kl
            n_tok += 1
            clipped += clp > unc
            ratio_sum += ratio

    def agg(x):
        if aggregation in ("token-mean", "token-sum-norm"):
            s = sum(x[b, t] for b in range(B) for t in range(T) if mask[b, t])
            den = n_tok if aggregation == "token-mean" else B * T
            return s / den if den else 0.0
        per_seq = []
        for b in range(B):
            vals = [x[b, t] for t in range(T) if mask[b, t]]
            if vals:
                per_seq.append(sum(vals) / len(vals) if aggregation == "seq-mean-token-mean" else sum(vals))
        return sum(per_seq) / len(per_seq) if per_seq else 0.0

    return agg(tok), {
        "pg_loss": agg(pg_tok),
        "kl": agg(kl_tok),
        "clip_fraction": clipped / n_tok if n_tok else 0.0,
        "ratio_mean": ratio_sum / n_tok if n_tok else 0.0,
    }


def random_batch(seed, B=4, T=6, spread=0.5):
    rng = np.random.default_rng(seed)
    logp = rng.normal(-2.0, 1.0, (B, T)).astype(np.float32)
    old = (logp + rng.normal(0, spread, (B, T))).astype(np.float32)
    ref = (logp + rng.normal(0, spread, (B, T))).astype(np.float32)
    adv = rng.normal(0, 1.5, (B,)).astype(np.float32)
    mask = (rng.random((B, T)) < 0.7).astype(np.float32)
    mask[0] = 0.0  # one empty sequence
    mask[1, 0] = 1.0
    return logp, old, ref, adv, mask


# ------------------------------------------------------------------ advantages


@pytest.mark.parametrize("group_size", [1, 2, 4])
@pytest.mark.parametrize("normalize_std", [True, False])
def test_group_advantages_matches_loops(group_size, normalize_std):
    rewards = np.random.default_rng(group_size).normal(size=12).astype(np.float32)
    got = np.asarray(group_advantages(rewards, group_size, normalize_std=normalize_std))
    np.testing.assert_allclose(got, ref_advantages(rewards, group_size, normalize_std), rtol=1e-5, atol=1e-5)


def test_group_size_one_gives_zero_not_nan():
    got = np.asarray(group_advantages(np.array([0.3, -1.0, 7.0], np.float32), 1))
    assert np.all(got == 0.0)


def test_equal_rewards_give_zero_advantages():
    rewards = np.array([0.5] * 4 + [0.1, 0.2, 0.3, 0.4], np.float32)
    got = np.asarray(jax.jit(group_advantages, static_argnums=1)(rewards, 4))
    assert np.all(np.isfinite(got))
    np.testing.assert_array_equal(got[:4], 0.0)
    np.testing.assert_allclose(got[4:], ref_advantages(rewards[4:], 4), rtol=1e-5)


def test_registered_advantages():
    r = np.arange(8, dtype=np.float32) ** 2
    np.testing.assert_allclose(lookup("advantage", "grpo")(r, 4), ref_advantages(r, 4, True), rtol=1e-5)
    np.testing.assert_allclose(lookup("advantage", "drgrpo")(r, 4), ref_advantages(r, 4, False), rtol=1e-5)


def test_group_advantages_rejects_bad_layout():
    with pytest.raises(ValueError, match="multiple"):
        group_advantages(np.zeros(6), 4)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(np.zeros(6), 0)


def test_registry_errors():
    assert {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum-norm"} <= set(grpo.REGISTRY["aggregation"])
    with pytest.raises(ValueError, match="unknown aggregation"):
        lookup("aggregation", "nope")
    with pytest.raises(ValueError, match="already registered"):
        register("kl", "k3")(lambda a, b: a)
    with pytest.raises(ValueError, match="kind"):
        register("nope", "x")


# ------------------------------------------------------------------ loss vs reference


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("dual_clip,kl_coef", [(3.0, 0.01), (None, 0.1), (3.0, 0.0)])
def test_grpo_loss_matches_loops(aggregation, dual_clip, kl_coef):
    logp, old, ref, adv, mask = random_batch(7, spread=0.6)
    loss, m = grpo_loss(logp, old, ref, adv, mask, dual_clip=dual_clip, kl_coef=kl_coef, aggregation=aggregation)
    want, wm = ref_grpo(logp, old, ref, adv, mask, dual_clip=dual_clip, kl_coef=kl_coef, aggregation=aggregation)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)
    for key in ("pg_loss", "kl", "clip_fraction", "ratio_mean"):
        np.testing.assert_allclose(float(m[key]), wm[key], rtol=1e-5, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(float(m["pg_loss"] + kl_coef * m["kl"]), float(loss), rtol=1e-6, atol=1e-7)
    assert wm["clip_fraction"] > 0  # the batch really exercises the clip


def test_grpo_loss_under_jit_matches_eager():
    logp, old, ref, adv, mask = random_batch(3)
    f = jax.jit(lambda *a: grpo_loss(*a, aggregation="seq-mean-token-mean"))
    np.testing.assert_allclose(float(f(logp, old, ref, adv, mask)[0]), float(grpo_loss(logp, old, ref, adv, mask, aggregation="seq-mean-token-mean")[0]), rtol=1e-6)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_minibatch_accumulation_is_exact(aggregation):
    logp, old, ref, adv, mask = random_batch(11, B=6)
    full, _ = grpo_loss(logp, old, ref, adv, mask, aggregation=aggregation)
    num = den = 0.0
    for sl in (slice(0, 2), slice(2, 6)):
        _, m = grpo_loss(logp[sl], old[sl], ref[sl], adv[sl], mask[sl], aggregation=aggregation)
        num, den = num + float(m["loss_numerator"]), den + float(m["loss_denominator"])
    np.testing.assert_allclose(num / den, float(full), rtol=1e-5)


def test_ratio_one_gives_minus_mean_advantage():
    logp, _, _, adv, mask = random_batch(5)
    loss, m = grpo_loss(logp, logp, None, adv, mask, kl_coef=0.0)
    assert float(m["ratio_mean"]) == 1.0
    assert float(m["clip_fraction"]) == 0.0
    tokens_adv = [adv[b] for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]
    np.testing.assert_allclose(float(loss), -np.mean(tokens_adv), rtol=1e-6)


def test_clip_fraction_hand_made():
    # One token per sequence; ratios 1.5, 0.5, 1.5, 0.5 with A = +1, +1, -1, -1.
    r = np.array([1.5, 0.5, 1.5, 0.5])
    old = np.zeros((4, 2), np.float32)
    logp = np.stack([np.log(r), np.log(r)], axis=1).astype(np.float32)  # column 1 is masked out
    adv = np.array([1.0, 1.0, -1.0, -1.0], np.float32)
    mask = np.array([[1, 0]] * 4, np.float32)
    loss, m = grpo_loss(logp, old, None, adv, mask, kl_coef=0.0)
    # clip active for (A>0, r>1+eps) and (A<0, r<1-eps) only
    assert float(m["clip_fraction"]) == pytest.approx(0.5)
    assert float(loss) == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8) / 4, rel=1e-6)


def test_dual_clip_active_and_inactive():
    old = np.zeros((2, 1), np.float32)
    logp = np.log(np.array([[5.0], [2.0]])).astype(np.float32)
    adv = np.array([-1.0, -1.0], np.float32)
    mask = np.ones((2, 1), np.float32)
    loss, m = grpo_loss(logp, old, None, adv, mask, kl_coef=0.0, dual_clip=3.0)
    assert float(loss) == pytest.approx((3.0 + 2.0) / 2, rel=1e-6)  # 5 capped at 3; 2 untouched
    assert float(m["dual_clip_fraction"]) == pytest.approx(0.5)
    loss_off, m_off = grpo_loss(logp, old, None, adv, mask, kl_coef=0.0, dual_clip=None)
    assert float(loss_off) == pytest.approx((5.0 + 2.0) / 2, rel=1e-6)
    assert float(m_off["dual_clip_fraction"]) == 0.0
    # A > 0: the dual clip never applies
    loss_pos, _ = grpo_loss(logp, old, None, -adv, mask, kl_coef=0.0, dual_clip=3.0)
    assert float(loss_pos) == pytest.approx(-1.2, rel=1e-6)
    with pytest.raises(ValueError, match="dual_clip"):
        grpo_loss(logp, old, None, adv, mask, kl_coef=0.0, dual_clip=0.5)


def test_kl_coef_zero_ignores_reference():
    logp, old, ref, adv, mask = random_batch(2)
    a, ma = grpo_loss(logp, old, None, adv, mask, kl_coef=0.0)
    b, mb = grpo_loss(logp, old, ref, adv, mask, kl_coef=0.0)
    assert float(a) == float(b) and float(ma["kl"]) == 0.0
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, old, None, adv, mask, kl_coef=0.01)


def test_k3_kl_values():
    logp = np.array([[-1.0, -2.0]], np.float32)
    ref = np.array([[-1.0, -1.0]], np.float32)
    loss, m = grpo_loss(logp, logp, ref, np.zeros(1, np.float32), np.ones((1, 2), np.float32), kl_coef=1.0)
    want = (0.0 + (math.e - 1 - 1)) / 2
    assert float(m["kl"]) == pytest.approx(want, rel=1e-6)
    assert float(loss) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_all_zero_mask_gives_zero_loss_and_finite_grad(aggregation):
    logp, old, ref, adv, _ = random_batch(4)
    mask = np.zeros_like(logp)

    def f(lp):
        return grpo_loss(lp, old, ref, adv, mask, aggregation=aggregation)

    loss, m = f(logp)
    assert float(loss) == 0.0
    assert all(np.isfinite(float(v)) for v in m.values())
    g = jax.grad(lambda lp: f(lp)[0])(jnp.asarray(logp))
    assert np.all(np.asarray(g) == 0.0)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_grad_finite_for_extreme_inputs(aggregation):
    B, T = 3, 4
    logp = np.array([[-1e4, 50.0, -30.0, -np.inf], [0.0, -80.0, 1e4, np.nan], [-1.0, -1.0, -1.0, -1.0]], np.float32)
    old = np.array([[0.0, -50.0, 30.0, 0.0], [-1e4, 80.0, -1e4, 0.0], [-1.0, -1.0, -1.0, -1.0]], np.float32)
    ref = np.array([[1e4, -1e4, 0.0, np.inf], [-1e4, 1e4, -3.0, 0.0], [-1.0, -1.0, -1.0, -1.0]], np.float32)
    adv = np.array([1e3, -1e3, 0.0], np.float32)
    mask = np.ones((B, T), np.float32)
    mask[0, 3] = mask[1, 3] = 0.0  # garbage (inf / nan) only at padding

    def f(lp):
        return grpo_loss(lp, old, ref, adv, mask, kl_coef=0.01, aggregation=aggregation)[0]

    loss, g = jax.value_and_grad(f)(jnp.asarray(logp))
    assert np.isfinite(float(loss))
    g = np.asarray(g)
    assert np.all(np.isfinite(g))
    assert g[0, 3] == 0.0 and g[1, 3] == 0.0


def test_grad_matches_analytic_when_unclipped():
    logp, _, _, adv, mask = random_batch(9)
    old = logp - 0.05  # ratio ≈ 1.05 inside the clip window
    g = np.asarray(jax.grad(lambda lp: grpo_loss(lp, old, None, adv, mask, kl_coef=0.0)[0])(jnp.asarray(logp)))
    ratio = np.exp(logp - old)
    want = -adv[:, None] * ratio * mask / mask.sum()
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ token_logprobs


def plain_logprobs(hidden, kernel, targets):
    logits = jnp.einsum("btd,dv->btv", hidden.astype(jnp.float32), kernel.astype(jnp.float32))
    ls = jax.nn.log_softmax(logits, axis=-1)
    logp = jnp.take_along_axis(ls, targets[..., None], axis=-1)[..., 0]
    ent = -jnp.sum(jnp.exp(ls) * ls, axis=-1)
    return logp, ent


def _inputs(V=37, B=2, T=3, D=5, seed=0, scale=3.0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    hidden = jax.random.normal(k1, (B, T, D)) * scale
    kernel = jax.random.normal(k2, (D, V))
    targets = jax.random.randint(k3, (B, T), 0, V)
    return hidden, kernel, targets


@pytest.mark.parametrize("chunk", [8, 10, 37, 64, 1])
def test_token_logprobs_matches_plain(chunk):
    hidden, kernel, targets = _inputs()
    lp, ent = jax.jit(lambda h, k, t: token_logprobs(h, k, t, chunk_size=chunk))(hidden, kernel, targets)
    want_lp, want_ent = plain_logprobs(hidden, kernel, targets)
    assert lp.dtype == jnp.float32 and lp.shape == targets.shape
    np.testing.assert_allclose(lp, want_lp, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(ent, want_ent, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [8, 37])
def test_token_logprobs_gradients_match_plain(chunk):
    hidden, kernel, targets = _inputs(seed=1)
    w = jax.random.normal(jax.random.key(5), targets.shape)

    def objective(fn):
        def f(h, k):
            lp, ent = fn(h, k)
            return jnp.sum(w * lp) + 0.3 * jnp.sum(w * ent)

        return jax.jit(jax.grad(f, argnums=(0, 1)))

    gh, gk = objective(lambda h, k: token_logprobs(h, k, targets, chunk_size=chunk))(hidden, kernel)
    wh, wk = objective(lambda h, k: plain_logprobs(h, k, targets))(hidden, kernel)
    np.testing.assert_allclose(gh, wh, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(gk, wk, atol=1e-5, rtol=1e-5)


def test_token_logprobs_bf16_inputs_give_fp32():
    hidden, kernel, targets = _inputs(seed=2)
    lp, ent = token_logprobs(hidden.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), targets, chunk_size=8)
    want_lp, want_ent = plain_logprobs(hidden.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), targets)
    assert lp.dtype == jnp.float32 and ent.dtype == jnp.float32
    np.testing.assert_allclose(lp, want_lp, atol=1e-5, rtol=1e-5)


def _all_shapes(jaxpr, out):
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            out.append(tuple(getattr(v.aval, "shape", ())))
        for p in eqn.params.values():
            subs = p if isinstance(p, (list, tuple)) else [p]
            for s in subs:
                inner = getattr(s, "jaxpr", s)
                if hasattr(inner, "eqns"):
                    _all_shapes(inner, out)
    return out


def test_token_logprobs_never_builds_full_logits():
    B, T, D, V = 2, 3, 5, 37
    hidden, kernel, targets = _inputs(V=V, B=B, T=T, D=D)

    def f(h, k):
        lp, ent = token_logprobs(h, k, targets, chunk_size=8)
        return jnp.sum(lp) + jnp.sum(ent)

    shapes = _all_shapes(jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(hidden, kernel).jaxpr, [])
    # Nothing of logits size: neither [.., V] rows nor per-chunk residuals stacked by the scan.
    big = B * T * V // 2
    bad = [s for s in shapes if s != (D, V) and (s[-1:] == (V,) and len(s) >= 2 or math.prod(s) >= big)]
    assert not bad, bad
    assert any(s[-1:] == (8,) for s in shapes)  # the chunk really is what gets materialised


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([0.1, 3.0, 30.0]))
def test_token_logprobs_property(seed, scale):
    hidden, kernel, targets = _inputs(seed=seed % 1000, scale=scale)
    lp, ent = _jit_chunked(hidden, kernel, targets)
    want_lp, want_ent = plain_logprobs(hidden, kernel, targets)
    np.testing.assert_allclose(lp, want_lp, atol=1e-4 * max(1.0, scale / 3), rtol=1e-5)
    np.testing.assert_allclose(ent, want_ent, atol=1e-5 * max(1.0, scale), rtol=1e-4)
    assert np.all(np.asarray(ent) >= -1e-5) and np.all(np.asarray(lp) <= 1e-6)


_jit_chunked = jax.jit(lambda h, k, t: token_logprobs(h, k, t, chunk_size=10))
