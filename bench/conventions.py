"""Names shared by the runner, metrics and reports: defined once here so they cannot drift apart."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

STAGES = ("train", "hessian", "prior", "predict", "evaluate")  # timed stages, in report order (others follow)
EXTRACT_STAGE = "extract"  # a frozen trunk's feature extraction, charged once per run to BASE_METHOD
BASE_METHOD = "base"  # pseudo-method charged with the shared base training of post-hoc methods
REFERENCE_METHOD = "plain"  # paired differences are taken against this method
CORRECTNESS_METRIC = "mAP@1"  # per-query correctness (precision@1 in {0, 1}) for calibration
NEAR_OOD_SET = "heldout"  # the OOD set made of the ID dataset's own held-out classes
DISTANCES = ("euclidean", "cosine")  # embedding geometries: plain L2, or L2 between L2-normalised embeddings
ID_SET = "id"  # query-set name of the ID test queries (next to OOD set names) in saved score vectors

# Per-score metric names: `<metric>:<score>`, e.g. `AUSE:top1_flip`, `AUROC[heldout]:trace`,
# `Spearman_within:dist_var`. The unsuffixed headline names (`ECE`, `AUSE`, `AURG`, `AUROC[set]`, ...)
# are the run's default scores' (config id_score for ID metrics, ood_score for OOD metrics).
SCORE_SEP = ":"


def score_metric(metric: str, score: str) -> str:
    """`AUSE`, `top1_flip` -> `AUSE:top1_flip`."""
    return f"{metric}{SCORE_SEP}{score}"


def split_score_metric(name: str) -> tuple[str, str | None]:
    """`AUROC[heldout]:trace` -> (`AUROC[heldout]`, `trace`); a headline name -> (name, None)."""
    metric, sep, score = name.rpartition(SCORE_SEP)
    return (metric, score) if sep and metric else (name, None)


FEATURE_VERSION = (
    2  # frozen-trunk features: bump when the features methods see change (also in the head's model-cache key)
)


# Per-query arrays of uncertainty scores (in a run folder's per-query files and in memory): one vector
# [N] per (query set, score), named `score__<set>__<score>`.
_SCORE_ARRAY = re.compile(r"^score__(?P<set>.+?)__(?P<score>.+)$")


def score_array(query_set: str, score: str) -> str:
    """Name, in a per-query file, of the vector [N] of uncertainty score `score` on query set
    `query_set` (`id` for the ID test queries, else an OOD set's name): `score__<set>__<score>`."""
    return f"score__{query_set}__{score}"


def score_arrays(arrays: dict[str, np.ndarray]) -> dict[tuple[str, str], np.ndarray]:
    """{(query set, score): vector} of the score vectors in a per-query file's arrays."""
    return {(m["set"], m["score"]): v for k, v in arrays.items() if (m := _SCORE_ARRAY.match(k))}
