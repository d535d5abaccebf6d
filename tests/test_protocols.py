"""The two protocols on the same data: closed (train and retrieve on the classes not held out,
held-out classes as near-OOD) and zero_shot (train on the first half of the classes, retrieve among
the unseen classes' test images); both give the same metric table."""

from __future__ import annotations

import numpy as np
import pytest

from bench.config import preset_config
from bench.data import DataSource, load_benchmark, protocol_indices
from bench.errors import BenchError
from bench.run_folder import RunFolder
from bench.runner import run


def _src(**kw):
    y = np.arange(40) % 8
    return DataSource(
        "toy",
        np.zeros((40, 2), np.float32),
        y,
        np.zeros((40, 2), np.float32),
        y,
        [str(c) for c in range(8)],
        **kw,
    )


def test_zero_shot_indices_split_the_classes_in_half():
    cfg = preset_config("smoke").replace(protocol="zero_shot")
    src = _src()
    tr, te, near = protocol_indices(src, cfg)
    assert set(src.train_y[tr]) == {0, 1, 2, 3} and set(src.test_y[te]) == {4, 5, 6, 7} and near is None
    tr, te, _ = protocol_indices(_src(seen_classes=6), cfg)
    assert set(src.train_y[tr]) == set(range(6)) and set(src.test_y[te]) == {6, 7}
    closed = preset_config("smoke").replace(heldout_classes=(1, 5))
    tr, te, near = protocol_indices(src, closed)
    assert set(src.train_y[tr]) == set(src.test_y[te]) == {0, 2, 3, 4, 6, 7} and set(src.test_y[near]) == {
        1,
        5,
    }
    with pytest.raises(BenchError, match="protocol=zero_shot"):
        protocol_indices(_src(split_by_class=True), closed)


def test_zero_shot_benchmark_has_no_heldout_set():
    cfg = preset_config("smoke").replace(dataset="synthetic", protocol="zero_shot", far_ood=None)
    data = load_benchmark(cfg)
    assert int(data.train_id.y.max()) <= 4 and int(data.test_id.y.min()) >= 5
    assert list(data.test_ood) == ["noise"]


def test_both_protocols_report_the_same_metric_table(tmp_path):
    tables = {}
    for protocol in ("closed", "zero_shot"):
        cfg = preset_config("smoke").replace(
            dataset="synthetic",
            protocol=protocol,
            methods=("plain", "diag_la"),
            out=str(tmp_path / protocol),
            quiet=True,
            report=False,
            far_ood=(),
        )
        res = RunFolder(run(cfg, log=lambda *a: None)).results
        tables[protocol] = set(res["metric"])
    # the closed protocol's held-out set adds its OOD rows; every other metric is shared
    assert tables["zero_shot"] == {m for m in tables["closed"] if "[heldout]" not in m}
    assert {"mAP@1", "ECE", "AUSE"} <= tables["zero_shot"]
