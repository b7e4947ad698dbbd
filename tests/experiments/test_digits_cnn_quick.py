"""The residual-CNN digits study's --quick mode: every arm trained, the report written."""

import json
import math

from experiments import digits_cnn


def test_quick_mode_trains_every_arm_and_writes_the_report(tmp_path):
    results = digits_cnn.main(["--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "digits_cnn.json").read_text())
    assert data["config"]["seeds"] == [0, 1]
    methods = {r["method"] for r in results["runs"]}
    assert methods == {
        "isotropic", "hinton", "shortcut", "selection", "mean-only", "aligned[full]",
        "aligned[diag]", "aligned[kron]", "aligned+hinton",
    }  # fmt: skip
    assert {r["student"] for r in results["runs"]} == {"narrow", "shallow", "both"}
    for r in results["runs"]:
        assert all(math.isfinite(r[m]) for m in digits_cnn.METRICS)
        assert 0.0 <= r["accuracy"] <= 1.0 and r["nll"] > 0
        if r["method"].startswith("aligned") or r["method"] in ("shortcut", "mean-only"):
            assert r["plan_cost"] >= 0
    for row in data["summary"].values():
        assert row["k"] == 2
        if row["method"] == "isotropic":
            assert row["nll"]["diff"] == 0.0
        else:
            assert row["nll"]["lo"] <= row["nll"]["diff"] <= row["nll"]["hi"]
    md = (tmp_path / "digits_cnn.md").read_text()
    assert md.startswith("# Digits, residual CNN")
    assert "aligned[full] − mean-only" in md and "aligned[full] − selection" in md
    assert (tmp_path / "digits_cnn.png").exists()
