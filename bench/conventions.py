"""Names shared by the runner, metrics and reports: defined once here so they cannot drift apart."""
from __future__ import annotations

STAGES = ("train", "hessian", "prior", "predict", "evaluate")  # timed stages, in report order (others follow)
EXTRACT_STAGE = "extract"  # a frozen trunk's feature extraction, charged once per run to BASE_METHOD
BASE_METHOD = "base"  # pseudo-method charged with the shared base training of post-hoc methods
REFERENCE_METHOD = "plain"  # paired differences are taken against this method
CORRECTNESS_METRIC = "mAP@1"  # per-query correctness (precision@1 in {0, 1}) for calibration
NEAR_OOD_SET = "heldout"  # the OOD set made of the ID dataset's own held-out classes
DISTANCES = ("euclidean", "cosine")  # embedding geometries: plain L2, or L2 between L2-normalised embeddings
