"""Comparing circuits: ROC AUC and precision at k = |truth| (equal to recall there) of one method's
head scores against another circuit taken as ground truth (as Conmy et al. 2023 §4.1 and O'Neill &
Bui 2024 §4 score methods against the manual circuits), and the overlap of two tasks' circuits
(Merullo et al. 2023 §5: share of in-circuit heads reused across tasks)."""
from __future__ import annotations

import torch

from .circuit import Circuit


def _scores(c) -> torch.Tensor:
    s = c.head_scores() if isinstance(c, Circuit) else torch.as_tensor(c.scores if hasattr(c, "scores") else c)
    return s.abs() if isinstance(c, Circuit) and c.rank_by_abs else s


def _truth(truth, n_truth):
    if isinstance(truth, Circuit):
        return truth.in_circuit(n_truth)
    t = torch.as_tensor(truth)
    if t.dtype != torch.bool:
        raise ValueError("ground truth must be a Circuit (with n_truth) or a [layer, head] bool mask")
    return t


def roc_auc(scores, truth, n_truth: int = 10) -> dict:
    """ROC AUC of ``scores`` (Circuit / HeadScores / [layer, head] tensor) for the heads of
    ``truth`` (a Circuit's top-``n_truth`` heads, or a bool mask), plus the precision of the scores'
    own top-k heads with k = ``n_true`` = the number of true heads.

    Returns {"auc", "precision", "recall", "n_true"}. Because k equals the number of true heads,
    precision (hits / k) and recall (hits / number of true heads) are the same number by
    construction: the R-precision. ``recall`` is kept, equal to ``precision``, for the callers that
    read it (the ``headscope circuit --compare`` printout, saved JSON); it is not a second measure."""
    from sklearn.metrics import roc_auc_score
    s = _scores(scores).flatten().numpy()
    t = _truth(truth, n_truth).flatten().numpy()
    if t.all() or not t.any():
        raise ValueError("the ground truth must contain some but not all heads")
    k = int(t.sum())
    top = torch.zeros(len(s), dtype=torch.bool)
    top[torch.as_tensor(s).topk(k).indices] = True
    tp = int((top & torch.as_tensor(t)).sum())
    precision = tp / k
    return {"auc": float(roc_auc_score(t, s)), "precision": precision, "recall": precision, "n_true": k}


def overlap(a, b, n: int = 10) -> dict:
    """Overlap of the top-``n`` heads of two circuits (e.g. two tasks): shared heads, share of a's
    heads found in b (Merullo et al.'s reuse number), Jaccard."""
    ma, mb = _truth(a, n), _truth(b, n)
    inter = int((ma & mb).sum())
    union = int((ma | mb).sum())
    shared = [f"L{l}H{h}" for l, h in torch.nonzero(ma & mb).tolist()]
    return {"n": n, "shared": shared, "fraction_of_a": inter / max(1, int(ma.sum())), "jaccard": inter / max(1, union)}


def spearman(a, b) -> float:
    """Spearman rank correlation of two head-score maps."""
    from scipy.stats import spearmanr
    return float(spearmanr(_scores(a).flatten().numpy(), _scores(b).flatten().numpy()).statistic)
