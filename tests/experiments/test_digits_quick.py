"""The digits study's --quick mode and the README's training job, through a real service."""

import json
import math

from experiments import digits, training_job


def test_quick_mode_runs_every_method_through_the_service(tmp_path):
    results = digits.main(["--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "digits.json").read_text())
    assert data["config"]["seeds"] == [0, 1]
    assert (tmp_path / "digits.md").read_text().startswith("# Digits")
    methods = {r["method"] for r in results["runs"]}
    assert methods == {
        "isotropic", "hinton[B]", "shortcut[B]", "aligned[B full]", "aligned[B diag]",
        "aligned[B kron]", "mean-only[B full]", "aligned+hinton[B full]",
    }  # fmt: skip
    md = (tmp_path / "digits.md").read_text()
    assert "aligned[B full] − mean-only[B full]" in md
    assert "aligned+hinton[B full] − hinton[B]" in md
    for r in results["runs"]:
        assert all(math.isfinite(r[m]) for m in digits.METRICS)
        assert 0.0 <= r["accuracy"] <= 1.0 and r["nll"] > 0
    for row in data["summary"].values():
        assert row["k"] == 2  # one run per seed
        if row["method"] == "isotropic":
            assert row["nll"]["diff"] == 0.0  # the baseline against itself
        else:
            assert row["nll"]["lo"] <= row["nll"]["diff"] <= row["nll"]["hi"]
    # the full posterior is uploaded as laplace-torch's precision, the others as they are
    assert {t["posteriors"]["full"] for t in results["teachers"]} == {"precision"}


def test_the_training_job_runs_end_to_end():
    out = training_job.main(["--steps", "40"])
    assert out["ops"] > 0 and out["plan_cost"] > 0
    assert 0.1 < out["student_map_accuracy"] <= 1.0  # better than chance on 10 classes
    assert math.isfinite(out["student_laplace_nll"])
