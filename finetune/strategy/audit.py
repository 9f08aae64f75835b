"""Audit the data before training: likely label errors, duplicates (and leakage across splits), outliers.

Everything here reads the cached pretrained features (`finetune.model.features`), so an audit costs
no backbone pass once `plan` or `train` has run:

* label issues: out-of-fold class probabilities of a cross-validated, strongly regularised logistic-regression
  probe on the final features; flagged by confident learning (cleanlab's `find_label_issues`, images whose
  probability of their given label is below their class's average, as many as the confident joint estimates)
  and ranked by that probability;
* duplicates: identical file contents (hash), and near duplicates whose L2-normalised final features
  have a cosine similarity of at least `NEAR_DUPLICATE_COSINE`, searched in row chunks so memory stays
  bounded. A pair is leakage (train vs val/test), conflicting (two classes) or redundant (one class);
* outliers: images whose cosine distance to the nearest class centroid (of train) is above the median
  plus `OUTLIER_MADS` robust standard deviations of the training images' distances.

Inputs it cannot use say so in `Audit.notes` instead of failing (one class, classes of 1-2 images).

Several labels per image (`AuditTable.label_sets`): the probe is one-vs-rest (one logistic regression per class,
the same penalty), cleanlab's multi-label `find_label_issues` flags the images whose label set the out-of-fold
probabilities disagree with (the suggestion: the classes above 0.5); a pair is conflicting when the two label
sets differ; each class's centroid is made of the training images that carry it. Labels show as `a;b`.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from finetune.data.multilabel import label_matrix

log = logging.getLogger(__name__)

# Measured on shared hymenoptera with mobilenetv2_100 (418 images): 20 planted copies (JPEG q75 re-encoded,
# resized to 0.6x, or cropped 5% a side) scored 0.83-0.99 (median 0.94) against their originals; of the
# 87k ordinary pairs the most similar scored 0.834 (same-class 99.9th percentile 0.78). 0.85 caught 19/20
# copies with no ordinary pair; `bench/audit.py` should re-check it on clothing.
NEAR_DUPLICATE_COSINE = 0.85
OUTLIER_MADS = 5.0  # robust standard deviations (1.4826 MAD) above the median distance to a centroid
MIN_MAD = 1e-3  # nearly identical training images: no spread to measure, do not flag every wobble
MIN_IMAGES_FOR_CV = 3  # a class needs this many training images to be cross-validated
CV_FOLDS = 5
# L2 strength of the probe per training image (C = 1 / (PROBE_L2_PER_IMAGE * n) on standardised features): a weak
# penalty lets the probe learn the wrong labels it should flag. bench/audit.py, docs/decisions.md "Audit probe".
PROBE_L2_PER_IMAGE = 0.3
LABEL_FILTER = "low_self_confidence"  # cleanlab's filter (precision first: docs/decisions.md)
MAX_PAIRS = 5000  # duplicate pairs kept in the report (the most similar); the count is always given
CHUNK_ELEMENTS = 1 << 24  # similarity entries computed at once (64 MiB of float32)
PAIR_KINDS = ("leakage", "conflicting", "redundant")


@dataclass(frozen=True)
class AuditTable:
    """Every image the audit looks at, all splits together; `x` rows are the final pooled features."""

    paths: list[str]
    labels: np.ndarray  # [n] class index
    splits: list[str]  # "train", "val" or "test"
    x: np.ndarray  # [n, C] float32
    valid: np.ndarray  # [n] bool: False where the image could not be decoded for features
    classes: list[str]
    label_sets: list[tuple[int, ...]] | None = None  # several labels per image: each image's classes

    @property
    def train(self) -> np.ndarray:
        return np.array([s == "train" for s in self.splits], dtype=bool)

    def label_of(self, i: int) -> str:
        """Image i's label as the report shows it: its class, or its classes joined by ;."""
        if self.label_sets is None:
            return self.classes[self.labels[i]]
        return ";".join(self.classes[c] for c in self.label_sets[i])

    def members(self, c: int) -> np.ndarray:
        """[n] bool: the images labelled with class c."""
        if self.label_sets is None:
            return self.labels == c
        return np.array([c in labels for labels in self.label_sets], dtype=bool)


@dataclass(frozen=True)
class LabelIssue:
    path: str
    given: str
    suggested: str
    score: float  # label quality: out-of-fold probability of the given label (lower: more suspect)
    suggested_probability: float


@dataclass(frozen=True)
class DuplicatePair:
    kind: str  # leakage | conflicting | redundant
    match: str  # exact (same file contents) | near (feature similarity)
    similarity: float
    a: str
    a_split: str
    a_label: str
    b: str
    b_split: str
    b_label: str


@dataclass(frozen=True)
class Outlier:
    path: str
    split: str
    label: str
    distance: float  # cosine distance to the nearest class centroid
    nearest_class: str


@dataclass
class Audit:
    label_issues: list[LabelIssue]
    duplicates: list[DuplicatePair]
    outliers: list[Outlier]
    notes: list[str] = field(default_factory=list)
    thresholds: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- label issues --------------------------------------------------------------------------------

def out_of_fold_probs(x: np.ndarray, y: np.ndarray, folds: int = CV_FOLDS, seed: int = 0) -> np.ndarray:
    """Class probabilities of each row from a logistic-regression probe that never saw it."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n_splits = int(min(folds, np.bincount(y).min()))
    c = 1.0 / (PROBE_L2_PER_IMAGE * len(y))
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000))
    cv = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dead feature columns, slow convergence on tiny folds: harmless
        return cross_val_predict(probe, x, y, cv=cv, method="predict_proba")


def find_label_issues(table: AuditTable, folds: int = CV_FOLDS, seed: int = 0) -> tuple[list[LabelIssue], list[str]]:
    """Training images whose given label the other images' probe disagrees with, most suspect first."""
    from cleanlab.filter import find_label_issues as cleanlab_issues

    if table.label_sets is not None:
        return find_multi_label_issues(table, folds, seed)
    rows = np.flatnonzero(table.train & table.valid)
    y = table.labels[rows]
    counts = np.bincount(y, minlength=len(table.classes))
    if len(table.classes) < 2:
        return [], ["One class: no other label an image could belong to, so no search for mislabeled images."]
    small = [table.classes[c] for c in np.flatnonzero((counts > 0) & (counts < MIN_IMAGES_FOR_CV))]
    notes = [f"Class(es) {', '.join(small)} have fewer than {MIN_IMAGES_FOR_CV} training images: too few to "
             "cross-validate, so their images are not checked for label errors nor suggested as labels."] if small else []
    kept = np.flatnonzero(counts >= MIN_IMAGES_FOR_CV)
    if len(kept) < 2:
        return [], notes + [f"Fewer than 2 classes with {MIN_IMAGES_FOR_CV}+ training images: no search for "
                            "mislabeled images."]
    rows = rows[np.isin(y, kept)]
    local = np.searchsorted(kept, table.labels[rows])  # class indices 0..k-1 for the probe and cleanlab
    probs = out_of_fold_probs(table.x[rows], local, folds, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ranked = cleanlab_issues(local, probs, filter_by=LABEL_FILTER, return_indices_ranked_by="self_confidence")
    issues = []
    for i in ranked:
        given = int(local[i])
        others = probs[i].copy()
        others[given] = -1.0
        best = int(np.argmax(others))
        issues.append(LabelIssue(table.paths[rows[i]], table.classes[kept[given]], table.classes[kept[best]],
                                 round(float(probs[i, given]), 4), round(float(probs[i, best]), 4)))
    return issues, notes


def find_multi_label_issues(table: AuditTable, folds: int = CV_FOLDS, seed: int = 0
                            ) -> tuple[list[LabelIssue], list[str]]:
    """Several labels per image: training images whose label set the out-of-fold one-vs-rest probe disagrees
    with (cleanlab's multi-label filter), most suspect first; a class on fewer than `MIN_IMAGES_FOR_CV` training
    images (or on all of them) has no probe of its own and is left out of the check."""
    from cleanlab.multilabel_classification.filter import find_label_issues as multi_label_issues
    from cleanlab.multilabel_classification.rank import get_label_quality_scores
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold, cross_val_predict
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rows = np.flatnonzero(table.train & table.valid)
    y = label_matrix([table.label_sets[r] for r in rows], len(table.classes))
    counts = y.sum(0)
    kept = np.flatnonzero((counts >= MIN_IMAGES_FOR_CV) & (counts <= len(rows) - MIN_IMAGES_FOR_CV))
    notes = [] if len(kept) == len(table.classes) else [
        f"Class(es) {', '.join(table.classes[c] for c in range(len(table.classes)) if c not in kept)} are on fewer "
        f"than {MIN_IMAGES_FOR_CV} training images (or on nearly all): not checked for label errors."]
    if len(kept) < 2 or len(rows) < 2 * folds:
        return [], notes + ["Too few training images or checkable classes: no search for mislabeled images."]
    probe = make_pipeline(StandardScaler(), OneVsRestClassifier(
        LogisticRegression(C=1.0 / (PROBE_L2_PER_IMAGE * len(rows)), max_iter=1000)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probs = cross_val_predict(probe, table.x[rows], y[:, kept], method="predict_proba",
                                  cv=KFold(n_splits=folds, shuffle=True, random_state=seed))
        given = [list(np.flatnonzero(row)) for row in y[:, kept]]
        flagged = multi_label_issues(given, probs, return_indices_ranked_by="self_confidence")
        quality = get_label_quality_scores(given, probs)
    issues = []
    for i in flagged:
        suggested = ";".join(table.classes[kept[k]] for k in np.flatnonzero(probs[i] > 0.5)) or "(none)"
        issues.append(LabelIssue(table.paths[rows[i]], table.label_of(rows[i]), suggested,
                                 round(float(quality[i]), 4), round(float(probs[i].max()), 4)))
    return issues, notes


# --- duplicates ----------------------------------------------------------------------------------

def normalized(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


def file_digest(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def exact_pairs(paths: Sequence[str]) -> list[tuple[int, int]]:
    """Pairs of files with identical contents: each later copy paired with the first one."""
    first: dict[str, int] = {}
    pairs = []
    for i, p in enumerate(paths):
        try:
            digest = file_digest(p)
        except OSError:
            continue
        if digest in first:
            pairs.append((first[digest], i))
        else:
            first[digest] = i
    return pairs


def similar_pairs(x: np.ndarray, threshold: float, limit: int = MAX_PAIRS) -> tuple[list[tuple[int, int, float]], int]:
    """Pairs (i < j) of normalised rows with cosine >= threshold: the `limit` most similar, and how many there are.

    Rows are compared chunk by chunk against all later rows, so memory stays at `CHUNK_ELEMENTS` entries.
    """
    n = len(x)
    chunk = max(1, CHUNK_ELEMENTS // max(1, n))
    best: list[tuple[int, int, float]] = []
    total = 0
    for start in range(0, n, chunk):
        sims = x[start:start + chunk] @ x.T
        rows, cols = np.nonzero(sims >= threshold)
        rows = rows + start
        later = cols > rows
        rows, cols = rows[later], cols[later]
        total += len(rows)
        values = sims[rows - start, cols]
        if len(values) > limit:  # keep only what could make the final list
            top = np.argpartition(-values, limit)[:limit]
            rows, cols, values = rows[top], cols[top], values[top]
        best += [(int(i), int(j), float(v)) for i, j, v in zip(rows, cols, values)]
        best = sorted(best, key=lambda t: -t[2])[:limit]
    return best, total


def pair_kind(split_a: str, split_b: str, label_a: int | str, label_b: int | str) -> str:
    if split_a != split_b and "train" in (split_a, split_b):
        return "leakage"
    return "redundant" if label_a == label_b else "conflicting"


def _pair(table: AuditTable, i: int, j: int, match: str, similarity: float) -> DuplicatePair:
    if table.splits[j] == "train" and table.splits[i] != "train":
        i, j = j, i  # the training image first
    kind = pair_kind(table.splits[i], table.splits[j], table.label_of(i), table.label_of(j))
    return DuplicatePair(kind, match, round(similarity, 4), table.paths[i], table.splits[i], table.label_of(i),
                         table.paths[j], table.splits[j], table.label_of(j))


def find_duplicates(table: AuditTable, threshold: float = NEAR_DUPLICATE_COSINE) -> tuple[list[DuplicatePair], list[str]]:
    """Exact and near-duplicate pairs, leakage first, then conflicting, then redundant; most similar first."""
    exact = exact_pairs(table.paths)
    seen = {(min(i, j), max(i, j)) for i, j in exact}
    rows = np.flatnonzero(table.valid)
    near, total = similar_pairs(normalized(table.x[rows]), threshold)
    pairs = [_pair(table, i, j, "exact", 1.0) for i, j in exact]
    pairs += [_pair(table, int(rows[a]), int(rows[b]), "near", s) for a, b, s in near
              if (int(rows[a]), int(rows[b])) not in seen]
    notes = []
    if total > len(near):
        notes.append(f"{total} near-duplicate pairs at cosine >= {threshold}; the {len(near)} most similar are listed.")
    pairs.sort(key=lambda p: (PAIR_KINDS.index(p.kind), -p.similarity))
    return pairs, notes


# --- outliers ------------------------------------------------------------------------------------

def centroid_distances(table: AuditTable) -> tuple[np.ndarray, np.ndarray]:
    """(cosine distance to the nearest class centroid of train, that class) for every image."""
    x = normalized(table.x)
    use = table.train & table.valid
    present = [c for c in range(len(table.classes)) if np.any(use & table.members(c))]
    centroids = normalized(np.stack([x[use & table.members(c)].mean(axis=0) for c in present]))
    sims = x @ centroids.T
    nearest = np.asarray(present)[sims.argmax(axis=1)]
    return 1.0 - sims.max(axis=1), nearest


def find_outliers(table: AuditTable, mads: float = OUTLIER_MADS) -> tuple[list[Outlier], float]:
    """Images far from every class centroid, farthest first, and the distance threshold used."""
    distance, nearest = centroid_distances(table)
    train = distance[table.train & table.valid]
    median = float(np.median(train))
    spread = max(1.4826 * float(np.median(np.abs(train - median))), MIN_MAD)
    threshold = median + mads * spread
    flagged = [i for i in np.argsort(-distance, kind="stable") if table.valid[i] and distance[i] > threshold]
    return [Outlier(table.paths[i], table.splits[i], table.label_of(i), round(float(distance[i]), 4),
                    table.classes[nearest[i]]) for i in flagged], threshold


def run_audit(table: AuditTable, seed: int = 0, near_threshold: float = NEAR_DUPLICATE_COSINE,
              outlier_mads: float = OUTLIER_MADS) -> Audit:
    """Every finding on one table of features; what could not be done is in `notes`."""
    if not np.any(table.train & table.valid):
        return Audit([], [], [], ["No training image has features: nothing to audit."])
    issues, notes = find_label_issues(table, seed=seed)
    pairs, pair_notes = find_duplicates(table, near_threshold)
    outliers, outlier_threshold = find_outliers(table, outlier_mads)
    counts = {"label_issues": len(issues), **{k: sum(p.kind == k for p in pairs) for k in PAIR_KINDS},
              "outliers": len(outliers), "images": len(table.paths)}
    thresholds = {"near_duplicate_cosine": near_threshold, "outlier_mads": outlier_mads,
                  "outlier_distance": round(outlier_threshold, 4)}
    return Audit(issues, pairs, outliers, notes + pair_notes, thresholds, counts)
