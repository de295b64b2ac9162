"""EGReward on hand-made embeddings: layout, outcome terms, judge candidates and bad completions."""
import numpy as np
import pytest

from embedrl_jax.data.records import PairRecord
from embedrl_jax.rl import RewardConfig, group_advantages, outcome_reward
from embedrl_jax.rl.rollout import EGReward, rollout_prompts

GOOD = '<thinking>a {"text_keywords": ["x"]}</thinking><rethink>ok</rethink><answer>x</answer>'


def _records(b):
    return [PairRecord(query={"text": f"find w{i}"}, positive={"text": f"photo of w{i}"}, key=str(i)) for i in range(b)]


def _embed_by_text(dim=8):
    """Embedding = one-hot of the keyword-ish last word of the T-CoT (or of the text)."""
    def embed(items):
        out = np.zeros((len(items), dim), np.float32)
        for i, it in enumerate(items):
            parts = it.get("tcot", {}).get("parts", [])
            words = " ".join(p["text"] for p in parts if p["type"] == "text") or it["text"]
            h = sum(map(ord, words.split()[-1])) % dim
            out[i, h] = 1.0
            out[i] += 0.01 * np.arange(dim)
        return out / np.linalg.norm(out, axis=1, keepdims=True)
    return embed


def test_rollout_prompts_interleave_query_and_positive():
    prompts = rollout_prompts(_records(2))
    assert len(prompts) == 4
    assert "find w0" in prompts[0]["text"] and "photo of w0" in prompts[1]["text"]
    assert "find w1" in prompts[2]["text"]


def test_outcome_part_equals_public_outcome_reward():
    recs = _records(3)
    n = 2
    rng = np.random.default_rng(0)
    texts = [[GOOD.replace("x", f"k{rng.integers(4)}") for _ in range(n)] for _ in range(6)]
    embed = _embed_by_text()
    rew = EGReward(embed, RewardConfig(use_judge=False))(recs, texts)
    # direct: embed the same items, split by side, call the public function
    from embedrl_jax.tcot import evidence_item
    items = [evidence_item(dict(r.query if s == 0 else r.positive), t) for r in recs for s in (0, 1)
             for t in texts[2 * recs.index(r) + s]]
    e = embed(items)
    rows = np.arange(12)
    q = (rows // n) % 2 == 0
    pair = rows // n // 2
    qr, pr = outcome_reward(e[q], e[~q], pair[q], pair[~q])
    np.testing.assert_allclose(rew.outcome[q], np.asarray(qr), atol=1e-6)
    np.testing.assert_allclose(rew.outcome[~q], np.asarray(pr), atol=1e-6)
    np.testing.assert_allclose(rew.total, 0.05 * rew.format + 0.8 * rew.outcome, atol=1e-6)
    assert (rew.format == 1).all() and (rew.process == 0).all()


@pytest.mark.parametrize("texts", [
    [[""], [""]],                       # empty completions
    [["no tags at all"], ["\udcff bad"]],  # no tags, lone surrogate
])
def test_bad_completions_give_finite_rewards_for_one_pair(texts):
    rew = EGReward(_embed_by_text(), RewardConfig(use_judge=False))(_records(1), texts)
    assert np.isfinite(rew.total).all()
    assert (rew.format == 0).all()
    adv = np.asarray(group_advantages(rew.total, 1))
    assert np.isfinite(adv).all() and (adv == 0).all()


def test_equal_rewards_give_zero_advantages():
    recs = _records(2)
    texts = [[GOOD] * 3 for _ in range(4)]
    rew = EGReward(lambda items: np.tile(np.eye(4, dtype=np.float32)[:1], (len(items), 1)),
                   RewardConfig(use_judge=False))(recs, texts)
    adv = np.asarray(group_advantages(rew.total, 3))
    assert np.isfinite(adv).all() and np.allclose(adv, 0)


def test_judge_sees_shuffled_candidates_and_pays_margin_for_a_positive():
    recs = _records(3)
    n = 2
    texts = [[GOOD.replace("x", f"q{k // 2}") if k % 2 == 0 else GOOD.replace("x", f"q{k // 2}")] * n
             for k in range(6)]
    seen = []

    def judge(prompts):
        seen.extend(prompts)
        replies = []
        for p in prompts:  # pick the first listed candidate whose text shares the query's pair word
            word = p.split("Query instruction: ")[1].split("\n")[0].split()[-1]
            cands = p.split("Candidates:")[1]
            numbered = [c for c in cands.split("\n\n") if c.strip()]
            pick = next(i for i, c in enumerate(numbered, 1) if word in c)
            replies.append(str(pick))
        return replies

    rew = EGReward(_embed_by_text(16), RewardConfig(use_judge=True), judge=judge, seed=3)(recs, texts)
    assert len(seen) == 12
    # every candidate list holds the pair's n rollouts + up to 4 hardest other pairs (2 exist here)
    assert all(p.count("\n\n") >= n + 2 - 1 for p in seen)
    np.testing.assert_allclose(rew.process, rew.margin, atol=1e-6)
    assert rew.stats["judge/picked_positive"] == 1.0
    # a judge without numbers: process 0, counted
    rew2 = EGReward(_embed_by_text(16), RewardConfig(use_judge=True), judge=lambda ps: ["none"] * len(ps))(recs, texts)
    assert (rew2.process == 0).all() and rew2.stats["judge/parse_fail"] == 1.0


def test_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match="expected 4"):
        EGReward(_embed_by_text(), RewardConfig(use_judge=False))(_records(2), [["a"]] * 3)
    with pytest.raises(ValueError, match="same number"):
        EGReward(_embed_by_text(), RewardConfig(use_judge=False))(_records(1), [["a"], ["a", "b"]])


def test_reward_batch_takes_every_weight_from_its_config():
    """The batch is the public pieces composed with the config's weights: a non-default config
    changes the outcome scale, temperature and total weights exactly as the public functions say."""
    from embedrl_jax.rl import outcome_terms, process_reward, total_reward

    recs, n = _records(3), 2
    rng = np.random.default_rng(5)
    texts = [[GOOD.replace("x", f"k{rng.integers(4)}") for _ in range(n)] for _ in range(6)]
    texts[1][0] = "no tags"  # one format failure
    cfg = RewardConfig(format_w=1.0, outcome_w=2.0, process_w=3.0, acc_w=0.7, neg_temperature=0.3, use_judge=True)
    rew = EGReward(_embed_by_text(16), cfg, judge=lambda ps: ["1"] * len(ps), seed=1)(recs, texts)
    q = rew.is_query
    t = outcome_terms(*_side_embeddings(recs, texts, n), temperature=0.3)
    qr, pr = t.reward(0.7)
    np.testing.assert_allclose(rew.outcome[q], np.asarray(qr), atol=1e-6)
    np.testing.assert_allclose(rew.outcome[~q], np.asarray(pr), atol=1e-6)
    np.testing.assert_allclose(rew.margin[q], np.asarray(t.q_margin), atol=1e-6)
    picked = rew.process != 0
    np.testing.assert_allclose(rew.process, np.asarray(process_reward(picked, rew.margin)), atol=1e-7)
    want = total_reward(rew.format, rew.outcome, rew.process, format_w=1.0, outcome_w=2.0, process_w=3.0)
    np.testing.assert_allclose(rew.total, np.asarray(want), atol=1e-6)
    assert rew.format.min() == 0 and rew.format.max() == 1
    assert not np.allclose(rew.total, 0.05 * rew.format + 0.8 * rew.outcome + 0.2 * rew.process)


def _side_embeddings(recs, texts, n):
    from embedrl_jax.tcot import evidence_item

    items = [evidence_item(dict(r.query if s == 0 else r.positive), t) for i, r in enumerate(recs) for s in (0, 1)
             for t in texts[2 * i + s]]
    e = _embed_by_text(16)(items)
    rows = np.arange(len(items))
    q = (rows // n) % 2 == 0
    pair = rows // n // 2
    return e[q], e[~q], pair[q], pair[~q]
