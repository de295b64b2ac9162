"""EG-RL rewards against direct numpy loop implementations of the §7 formulas."""
import dataclasses
import math
import re

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedrl_jax.rl import (
    RewardConfig,
    format_reward,
    hardest_negatives,
    judge_pick,
    outcome_reward,
    process_reward,
    row_outcome_terms,
    shuffle_candidates,
    total_reward,
)

# ------------------------------------------------------------------ numpy references (loops)


def ref_row_terms(sim, row_pair, col_pair, temperature=0.5):
    """Per row: sort columns by similarity (descending), negatives first on ties; count positives
    among the first |P|; margin = mean positive sim - softmax(neg / T)-weighted negative sim."""
    sim = np.asarray(sim, np.float64)
    R, C = sim.shape
    acc, margin = np.zeros(R), np.zeros(R)
    for a in range(R):
        pos = [c for c in range(C) if col_pair[c] == row_pair[a]]
        negs = [c for c in range(C) if col_pair[c] != row_pair[a]]
        k = len(pos)
        order = sorted(range(C), key=lambda c: (-sim[a, c], col_pair[c] == row_pair[a]))
        acc[a] = sum(1 for c in order[:k] if c in pos) / k if k else 0.0
        pos_mean = sum(sim[a, c] for c in pos) / k if k else 0.0
        neg_term = 0.0
        if negs:
            mx = max(sim[a, c] / temperature for c in negs)
            w = [math.exp(sim[a, c] / temperature - mx) for c in negs]
            neg_term = sum(wi * sim[a, c] for wi, c in zip(w, negs)) / sum(w)
        margin[a] = pos_mean - neg_term
    return acc, margin


def ref_outcome(q, p, q_pair, p_pair, temperature=0.5, scale=0.5):
    sim = np.asarray(q, np.float64) @ np.asarray(p, np.float64).T
    qa, qm = ref_row_terms(sim, q_pair, p_pair, temperature)
    pa, pm = ref_row_terms(sim.T, p_pair, q_pair, temperature)
    return scale * qa * qm, scale * pa * pm


def ref_hardest(sim, row_pair, col_pair, k):
    out = []
    for a in range(sim.shape[0]):
        best = {}
        for c in range(sim.shape[1]):
            pid = int(col_pair[c])
            if pid == int(row_pair[a]):
                continue
            if pid not in best or sim[a, c] > best[pid][0]:
                best[pid] = (sim[a, c], best.get(pid, (None, c))[1])
        ranked = sorted(best, key=lambda pid: (-best[pid][0], best[pid][1]))[:k]
        out.append(ranked + [-1] * (k - len(ranked)))
    return np.array(out)


def unit_rows(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ------------------------------------------------------------------ format reward

GOOD = "<thinking>look</thinking>\n<rethink>check</rethink><answer>cat</answer>"


@pytest.mark.parametrize(
    "text,want",
    [
        (GOOD, 1.0),
        ("<thinking></thinking><rethink></rethink><answer></answer>", 1.0),
        ("pre " + GOOD + " post <thinking>", 1.0),
        ("<thinking>a\nb</thinking>x<rethink>\n</rethink>y<answer>z\n</answer>", 1.0),
        ("<rethink>r</rethink><thinking>t</thinking><answer>a</answer>", 0.0),
        ("<thinking>t</thinking><answer>a</answer>", 0.0),
        ("<thinking>t<rethink>r</rethink></thinking><answer>a</answer>", 0.0),
        ("<thinking>t</thinking><rethink>r</rethink><answer>a", 0.0),
        ("", 0.0),
        ("no tags at all", 0.0),
        ("\u202e\U0001F600\x00\ud800 <thinking>", 0.0),
        ("<thinking>é</thinking><rethink>中</rethink><answer>\U0001F600</answer>", 1.0),
    ],
)
def test_format_reward_cases(text, want):
    got = format_reward([text])
    assert got.dtype == np.float32 and got.shape == (1,)
    assert got[0] == want


def test_format_reward_batch_and_odd_items():
    np.testing.assert_array_equal(format_reward([GOOD, "", None, 3, GOOD]), [1, 0, 0, 0, 1])
    np.testing.assert_array_equal(format_reward(GOOD), [1.0])
    assert format_reward([]).shape == (0,)


_REGEX = re.compile(r"<thinking>.*?</thinking>.*?<rethink>.*?</rethink>.*?<answer>.*?</answer>", re.DOTALL)
_PIECES = ["<thinking>", "</thinking>", "<rethink>", "</rethink>", "<answer>", "</answer>", "x", "\n", "<", ">", "/", "é"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=14), st.text(max_size=8))
def test_format_reward_equals_regex(pieces, noise):
    text = noise.join(pieces)
    assert format_reward([text])[0] == (1.0 if _REGEX.search(text) else 0.0)


# ------------------------------------------------------------------ outcome terms: ties


def test_pessimistic_tie_rule_explicit():
    col_pair = np.array([0, 0, 1, 1])
    row_pair = np.array([0, 0, 0, 1])
    sim = np.array(
        [
            [0.5, 0.3, 0.5, 0.1],  # tie at the cut between a positive and a negative -> 1/2
            [0.5, 0.5, 0.5, 0.5],  # everything tied -> negatives first -> 0
            [0.9, 0.5, 0.5, 0.1],  # top-1 positive, tie for slot 2 -> 1/2
            [0.2, 0.2, 0.7, 0.7],  # positives (pair 1) strictly on top -> 1
        ],
        np.float32,
    )
    acc, margin = jax.jit(row_outcome_terms)(sim, row_pair, col_pair)
    np.testing.assert_array_equal(np.asarray(acc), [0.5, 0.0, 0.5, 1.0])
    w = np.exp(np.array([0.5, 0.1]) / 0.5)
    want0 = 0.4 - (w @ np.array([0.5, 0.1])) / w.sum()
    assert float(margin[0]) == pytest.approx(want0, abs=1e-6)
    assert float(margin[1]) == pytest.approx(0.0, abs=1e-7)
    ref_acc, ref_margin = ref_row_terms(sim, row_pair, col_pair)
    np.testing.assert_array_equal(np.asarray(acc), ref_acc)
    np.testing.assert_allclose(np.asarray(margin), ref_margin, rtol=1e-5, atol=1e-6)


_jit_terms = jax.jit(row_outcome_terms)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_row_terms_with_many_ties_property(seed):
    rng = np.random.default_rng(seed)
    # Values from a tiny set so ties are everywhere; pair ids so some rows have no positive.
    sim = rng.choice(np.array([-0.5, 0.0, 0.25, 0.5, 1.0], np.float32), size=(6, 9))
    row_pair = rng.integers(0, 4, 6)
    col_pair = rng.integers(0, 4, 9)
    acc, margin = _jit_terms(sim, row_pair, col_pair, 0.5)
    ref_acc, ref_margin = ref_row_terms(sim, row_pair, col_pair)
    np.testing.assert_allclose(np.asarray(acc), ref_acc, atol=1e-7)
    np.testing.assert_allclose(np.asarray(margin), ref_margin, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ outcome reward

_jit_outcome = jax.jit(outcome_reward)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_outcome_reward_property_random_embeddings(seed):
    rng = np.random.default_rng(seed)
    n_pairs, n = 4, 3
    q = unit_rows(rng, n_pairs * n, 16)
    p = unit_rows(rng, n_pairs * n, 16)
    # make positives a bit closer so acc is not always 0
    p = p + 0.8 * q[rng.permutation(len(q))] * (rng.random((len(q), 1)) < 0.5)
    p = (p / np.linalg.norm(p, axis=1, keepdims=True)).astype(np.float32)
    pair = np.repeat(np.arange(n_pairs), n)
    q_r, p_r = _jit_outcome(q, p, pair, pair)
    want_q, want_p = ref_outcome(q, p, pair, pair)
    np.testing.assert_allclose(np.asarray(q_r), want_q, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(p_r), want_p, rtol=1e-4, atol=1e-6)


def test_outcome_reward_unequal_sides_and_odd_pair_ids():
    rng = np.random.default_rng(0)
    q_pair = np.array([7, 7, 3, 3, 9, 9])  # n = 2 query rollouts per pair
    p_pair = np.array([3, 9, 7, 3, 9, 7, 3, 7, 9])  # n = 3 positive rollouts per pair, interleaved
    q, p = unit_rows(rng, 6, 8), unit_rows(rng, 9, 8)
    q_r, p_r = outcome_reward(q, p, q_pair, p_pair, temperature=0.3, scale=1.0)
    want_q, want_p = ref_outcome(q, p, q_pair, p_pair, temperature=0.3, scale=1.0)
    assert q_r.shape == (6,) and p_r.shape == (9,)
    np.testing.assert_allclose(np.asarray(q_r), want_q, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(p_r), want_p, rtol=1e-4, atol=1e-6)


def test_outcome_reward_one_rollout_per_prompt():
    rng = np.random.default_rng(1)
    q, p = unit_rows(rng, 5, 8), unit_rows(rng, 5, 8)
    pair = np.arange(5)
    q_r, p_r = outcome_reward(q, p, pair, pair)
    want_q, want_p = ref_outcome(q, p, pair, pair)
    np.testing.assert_allclose(np.asarray(q_r), want_q, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(p_r), want_p, rtol=1e-4, atol=1e-6)


def test_outcome_reward_batch_of_one_pair():
    rng = np.random.default_rng(2)
    q, p = unit_rows(rng, 4, 8), unit_rows(rng, 4, 8)
    pair = np.zeros(4, np.int32)
    q_r, p_r = outcome_reward(q, p, pair, pair)
    # no negatives: acc = 1 and the margin is the mean positive similarity
    sim = q.astype(np.float64) @ p.T
    np.testing.assert_allclose(np.asarray(q_r), 0.5 * sim.mean(axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(p_r), 0.5 * sim.mean(axis=0), rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(np.asarray(q_r)))


def test_collapsed_embeddings_earn_nothing():
    e = np.ones((6, 4), np.float32) / 2.0
    pair = np.repeat(np.arange(3), 2)
    q_r, p_r = outcome_reward(e, e, pair, pair)
    np.testing.assert_array_equal(np.asarray(q_r), 0.0)
    np.testing.assert_array_equal(np.asarray(p_r), 0.0)


def test_perfect_retrieval_reward_is_not_constant():
    rng = np.random.default_rng(3)
    base = unit_rows(rng, 3, 32)
    q = np.repeat(base, 2, axis=0) + 0.05 * rng.normal(size=(6, 32)).astype(np.float32)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    pair = np.repeat(np.arange(3), 2)
    q_r, _ = outcome_reward(q, q, pair, pair)
    q_r = np.asarray(q_r)
    assert np.all(q_r > 0) and np.ptp(q_r) > 0


@pytest.mark.parametrize(
    "args,match",
    [
        ((np.zeros((4, 8)), np.zeros((4, 7)), np.zeros(4, int), np.zeros(4, int)), "D="),
        ((np.zeros((4,)), np.zeros((4, 8)), np.zeros(4, int), np.zeros(4, int)), "q_emb"),
        ((np.zeros((4, 8)), np.zeros((4, 8, 1)), np.zeros(4, int), np.zeros(4, int)), "p_emb"),
        ((np.zeros((4, 8)), np.zeros((4, 8)), np.zeros(3, int), np.zeros(4, int)), "q_pair"),
        ((np.zeros((4, 8)), np.zeros((5, 8)), np.zeros(4, int), np.zeros(4, int)), "p_pair"),
        ((np.zeros((4, 8)), np.zeros((4, 8)), np.zeros(4), np.zeros(4, int)), "q_pair.*integer"),
    ],
)
def test_outcome_reward_shape_errors(args, match):
    with pytest.raises(ValueError, match=match):
        outcome_reward(*args)


# ------------------------------------------------------------------ hard negatives


@pytest.mark.parametrize("k", [1, 2, 4, 6])
def test_hardest_negatives_matches_loops(k):
    rng = np.random.default_rng(k)
    sim = rng.choice(np.array([0.1, 0.2, 0.3, 0.9], np.float32), size=(5, 10))  # with ties
    row_pair = np.array([0, 1, 2, 3, 4])
    col_pair = np.array([4, 0, 1, 1, 2, 3, 0, 4, 2, 3])
    got = np.asarray(jax.jit(hardest_negatives, static_argnums=3)(sim, row_pair, col_pair, k))
    assert got.shape == (5, k) and got.dtype == np.int32
    np.testing.assert_array_equal(got, ref_hardest(sim, row_pair, col_pair, k))


def test_hardest_negatives_hand_made_and_padding():
    sim = np.array([[0.9, 0.1, 0.5, 0.6, 0.2]], np.float32)
    col_pair = np.array([0, 1, 2, 2, 1])
    got = np.asarray(hardest_negatives(sim, np.array([0]), col_pair, k=4))
    np.testing.assert_array_equal(got, [[2, 1, -1, -1]])
    # a batch of one pair has no negatives at all
    got = np.asarray(hardest_negatives(sim, np.array([0]), np.zeros(5, int), k=2))
    np.testing.assert_array_equal(got, [[-1, -1]])


# ------------------------------------------------------------------ process, judge, shuffle, total


def test_process_reward():
    got = process_reward(np.array([True, False, True]), np.array([0.3, 0.7, -0.2], np.float32))
    np.testing.assert_allclose(np.asarray(got), [0.3, 0.0, -0.2])


@pytest.mark.parametrize(
    "text,n,want",
    [
        ("3", 4, 2),
        ("Candidate 1 is best, not 2", 4, 0),
        ("The answer is [4].", 4, 3),
        ("5", 4, -1),
        ("0", 4, -1),
        ("-2", 4, -1),
        ("none of them", 4, -1),
        ("", 4, -1),
        (None, 4, -1),
        ("9" * 5000, 4, -1),
        ("候选 ２", 4, 1),
        ("\ud800 2", 3, 1),
    ],
)
def test_judge_pick(text, n, want):
    assert judge_pick(text, n) == want


def test_shuffle_candidates_deterministic_and_invertible():
    cands = [f"c{i}" for i in range(8)]
    a, perm_a = shuffle_candidates(cands, seed=41, call_index=3)
    b, perm_b = shuffle_candidates(cands, seed=41, call_index=3)
    assert a == b and np.array_equal(perm_a, perm_b)
    assert sorted(a) == cands
    for j in range(8):
        assert a[j] == cands[perm_a[j]]
    others = {tuple(shuffle_candidates(cands, 41, i)[1]) for i in range(10)}
    assert len(others) > 1
    assert shuffle_candidates([], 0, 0)[0] == []


def test_total_reward_and_config():
    cfg = RewardConfig()
    assert (cfg.format_w, cfg.outcome_w, cfg.process_w, cfg.acc_w, cfg.neg_temperature, cfg.judge_top_k, cfg.use_judge) == (
        0.05, 0.8, 0.2, 0.5, 0.5, 4, True,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.format_w = 1.0
    got = total_reward(np.array([1.0, 0.0]), np.array([0.2, 0.4]), np.array([0.1, 0.0]))
    np.testing.assert_allclose(np.asarray(got), [0.05 + 0.16 + 0.02, 0.32], rtol=1e-6)
    got = total_reward(1.0, 1.0, 1.0, format_w=1.0, outcome_w=2.0, process_w=3.0)
    assert float(got) == pytest.approx(6.0)


def test_end_to_end_reward_pipeline_under_jit():
    """Outcome -> hard negatives -> process -> total on one batch, all inside one jit."""
    rng = np.random.default_rng(4)
    q, p = unit_rows(rng, 8, 16), unit_rows(rng, 8, 16)
    pair = np.repeat(np.arange(4), 2)
    cfg = RewardConfig()

    @jax.jit
    def step(q, p, picked_positive, fmt):
        q_out, _ = outcome_reward(q, p, pair, pair, cfg.neg_temperature, scale=cfg.acc_w)
        sim = q @ p.T
        hard = hardest_negatives(sim, pair, pair, cfg.judge_top_k)
        _, margin = row_outcome_terms(sim, pair, pair, cfg.neg_temperature)
        proc = process_reward(picked_positive, margin)
        return total_reward(fmt, q_out, proc, format_w=cfg.format_w, outcome_w=cfg.outcome_w, process_w=cfg.process_w), hard

    picked = np.array([True, False] * 4)
    fmt = format_reward([GOOD, ""] * 4)
    total, hard = step(q, p, picked, fmt)
    want_q, _ = ref_outcome(q, p, pair, pair)
    _, margin = ref_row_terms(q.astype(np.float64) @ p.T, pair, pair)
    want = 0.05 * fmt + 0.8 * want_q + 0.2 * np.where(picked, margin, 0.0)
    np.testing.assert_allclose(np.asarray(total), want, rtol=1e-4, atol=1e-6)
    assert hard.shape == (8, 4) and np.all(np.asarray(hard)[:, 3] == -1)  # only 3 other pairs
