"""MMEB-V2 metrics against numpy on hand-made rankings (ties, several positives, graded qrels,
k larger than the pool), and the official graded-pairing quirk behind its switch."""
import numpy as np
import pytest

from embedrl_jax.eval.metrics import KS, SCORE_KEYS, query_metrics, rank, task_scores


def numpy_metrics(pred, labels, grades=None):
    """Independent numpy form: relevance vectors, cumulative sums, sorted ideal gains."""
    pred = np.asarray(pred, dtype=object)
    lab = np.asarray(sorted(set(labels)), dtype=object)
    out = {}
    for k in KS:
        top = pred[:k]
        is_rel = np.isin(top, lab)
        # a name repeated in the ranking counts once in the set-based metrics
        found = np.isin(lab, top).sum()
        if grades is None:
            rel = is_rel.astype(float)
            ideal = np.ones(min(len(lab), k))
        else:
            rel = np.array([grades.get(n, 0.0) for n in top], float)
            ideal = np.sort(np.asarray(list(grades.values()), float))[::-1][:k]
        disc = 1.0 / np.log2(np.arange(len(top)) + 2)
        for name, g in (("linear", lambda x: x), ("exponential", lambda x: 2.0 ** x - 1)):
            idcg = (g(ideal) * disc[: len(ideal)]).sum() if len(ideal) <= len(disc) else \
                (g(ideal) / np.log2(np.arange(len(ideal)) + 2)).sum()
            out[f"ndcg_{name}@{k}"] = (g(rel) * disc).sum() / idcg if idcg > 0 else 0.0
        p, r = found / k, found / len(lab)
        out[f"hit@{k}"] = float(is_rel.any())
        out[f"precision@{k}"] = p
        out[f"recall@{k}"] = r
        out[f"f1@{k}"] = 2 * p * r / (p + r) if p + r else 0.0
        prec_at = np.cumsum(is_rel) / (np.arange(len(top)) + 1)
        out[f"map@{k}"] = (prec_at * is_rel).sum() / min(len(lab), k)
        first = np.flatnonzero(is_rel)
        out[f"mrr@{k}"] = 1.0 / (first[0] + 1) if len(first) else 0.0
    return out


CASES = [
    # (prediction, labels, grades)
    (["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k"], ["a"], None),           # positive first
    (["x", "y", "a", "z"], ["a"], None),                                               # k larger than the pool (4)
    (["x", "a", "y", "b", "z", "w", "c", "v", "u", "t", "s", "c2"], ["a", "b", "c"], None),  # several positives
    (["x", "y", "z"], ["q"], None),                                                    # no hit at all
    (["a", "a", "b", "x"], ["a", "b"], None),                                          # a name repeated in a local list
    (["1031", "1060", "1030", "x", "1032"], ["1030", "1031", "1032", "1060"],
     {"1030": 3.0, "1031": 2.0, "1032": 2.0, "1060": 1.0}),                          # graded qrels
    (["p2", "d", "p3"], ["p3", "p2"], {"p3": 3.0, "p2": 2.0}),                          # graded, short pool
]


@pytest.mark.parametrize("pred,labels,grades", CASES)
def test_metrics_match_numpy(pred, labels, grades):
    rel = None if grades is None else [grades[lab] for lab in labels]
    got = query_metrics(pred, labels, rel)
    want = numpy_metrics(pred, labels, grades)
    assert set(got) == set(SCORE_KEYS[:-2])
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


def test_hand_computed_values():
    m = query_metrics(["x", "a", "y", "b"], ["a", "b"])
    assert m["hit@1"] == 0 and m["hit@5"] == 1 and m["mrr@5"] == 0.5
    assert m["precision@5"] == pytest.approx(2 / 5) and m["recall@1"] == 0 and m["recall@5"] == 1
    assert m["map@5"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert m["ndcg_linear@5"] == pytest.approx((1 / np.log2(3) + 1 / np.log2(5)) / (1 + 1 / np.log2(3)))
    # graded: gains 3 at rank 2 and 2 at rank 1; ideal 3, 2
    g = query_metrics(["p2", "p3"], ["p3", "p2"], [3.0, 2.0])
    assert g["ndcg_linear@5"] == pytest.approx((2 + 3 / np.log2(3)) / (3 + 2 / np.log2(3)))
    assert g["ndcg_exponential@5"] == pytest.approx((3 + 7 / np.log2(3)) / (7 + 3 / np.log2(3)))


def test_official_pairing_reproduces_the_set_order_quirk():
    labels, grades = [1030, 1031, 1032, 1060], [3.0, 2.0, 2.0, 1.0]
    shuffled = list(set(labels))
    pred = [1030, 1031, 1032, 1060]
    quirk = query_metrics(pred, labels, grades, official_pairing=True)
    want = numpy_metrics(pred, labels, dict(zip(shuffled, grades)))
    assert quirk["ndcg_linear@5"] == pytest.approx(want["ndcg_linear@5"])
    correct = query_metrics(pred, labels, grades)
    assert correct["ndcg_linear@5"] == pytest.approx(1.0)  # the ideal order under the right grades
    if shuffled != labels:  # set order differs from qrels order here: the grades land elsewhere
        assert quirk["ndcg_linear@5"] < 1.0


def test_rank_is_stable_on_ties_and_task_scores_keep_the_official_key_order():
    s = np.array([0.5, 0.9, 0.5, 0.9, 0.1])
    assert rank(s).tolist() == [1, 3, 0, 2, 4]
    per = [query_metrics(["a", "b"], ["a"]), query_metrics(["b", "a"], ["a"])]
    obj = task_scores(per)
    assert tuple(obj) == SCORE_KEYS and len(SCORE_KEYS) == 26
    assert obj["hit@1"] == 0.5 and obj["mrr@10"] == 0.75 and obj["num_pred"] == obj["num_data"] == 2
    assert isinstance(obj["num_data"], int) and isinstance(obj["hit@1"], float)


def test_a_query_without_labels_is_an_error():
    with pytest.raises(ValueError, match="label"):
        query_metrics(["a"], [])
    with pytest.raises(ValueError, match="rel_scores"):
        query_metrics(["a"], ["a", "b"], [1.0])
