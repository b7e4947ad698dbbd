"""The experiment's --quick mode runs through a real service and writes its two files."""

import json
import math

from experiments import seed_synthetic


def test_quick_mode_runs_through_the_service(tmp_path):
    results = seed_synthetic.main(["--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "seed_synthetic.json").read_text())
    assert (tmp_path / "seed_synthetic.md").read_text().startswith("# The seed's synthetic")
    assert set(data["students"]) == {"[10, 5, 5, 1]", "[10, 10, 1]"}
    for student in results["students"].values():
        assert student["planned_cost"] >= 0
        for name in seed_synthetic.PRIORS:
            S = student["S"][name]["S"]
            assert len(S) == 2 and all(math.isfinite(x) for x in S)
            assert all(len(r["loglik"]) == len(r["steps"]) > 0 for r in student["runs"][name])
        assert student["S"]["none"]["mean"] == 0.0  # the baseline against itself
