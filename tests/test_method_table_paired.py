"""bench/method_table.py's paired section on synthetic run records: per-seed differences, their t-intervals
and the fraction of the uniform-to-FP gap a method closes."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import method_table  # noqa: E402

T_975_2 = 4.303  # Student t, 0.975 quantile, 2 degrees of freedom (table value)


def record(method: str, seed: int, **values) -> dict:
    return {"preset": "tfmq_compat", "method": method, "bits": "W4A8", "seed": seed, "status": "ok", **values}


def test_paired_differences_and_gap_closed_on_known_numbers():
    # uniform / gac per seed: sample MSE 0.4 / 0.1, 0.2 / 0.1, 0.5 / 0.5 -> gap closed 0.75, 0.5, 0
    uniform = [(0.4, 0.90, 2.0), (0.2, 0.80, 4.0), (0.5, 0.60, 1.0)]
    gac = [(0.1, 0.95, 1.0), (0.1, 0.90, 2.0), (0.5, 0.80, 1.0)]
    records = []
    for seed, ((mu, su, fu), (mg, sg, fg)) in enumerate(zip(uniform, gac)):
        records.append(record("uniform", seed, sample_mse=mu, ssim=su, fid_to_fp=fu, fid=1.0 + seed))
        records.append(record("gac", seed, sample_mse=mg, ssim=sg, fid_to_fp=fg, fid=1.5 + seed))
    records.append(record("gac", 3, sample_mse=0.0, ssim=1.0, fid_to_fp=0.0))        # no uniform partner: left out
    records.append({**record("uniform", 3), "status": "evaluate failed"})
    records.append(record("rtn", 0, sample_mse=9.0))                                 # not in the pair
    [p] = method_table.paired(records, [["gac", "uniform"]])
    assert (p["a"], p["b"], p["preset"], p["bits"], p["seeds"]) == ("gac", "uniform", "tfmq_compat", "W4A8", [0, 1, 2])

    d = p["diff"]["sample_mse"]                                  # -0.3, -0.1, 0: mean -0.1333, s = 0.1528
    assert d["values"] == pytest.approx([-0.3, -0.1, 0.0]) and d["n"] == 3
    assert d["mean"] == pytest.approx(-0.4 / 3)
    assert d["ci95"] == pytest.approx(T_975_2 * math.sqrt(0.07 / 3) / math.sqrt(3), abs=1e-3)
    assert p["diff"]["fid"]["values"] == pytest.approx([0.5, 0.5, 0.5]) and p["diff"]["fid"]["ci95"] == pytest.approx(0)
    assert p["diff"]["psnr"]["n"] == 0 and p["diff"]["psnr"]["mean"] is None   # not measured: no number made up

    g = p["gap_closed"]
    assert g["sample_mse"]["values"] == pytest.approx([0.75, 0.5, 0.0]) and g["sample_mse"]["mean"] == pytest.approx(0.25 * 5 / 3)
    assert g["sample_mse"]["ci95"] == pytest.approx(T_975_2 * 0.381881 / math.sqrt(3), abs=1e-3)
    assert g["ssim"]["values"] == pytest.approx([0.5, 0.5, 0.5])             # (a - u) / (1 - u)
    assert g["fid_to_fp"]["values"] == pytest.approx([0.5, 0.5, 0.0])
    assert g["psnr"]["values"] == g["sample_mse"]["values"] and g["psnr"]["same_as"] == "sample_mse"
    assert g["timestep_mse"]["n"] == 0


def test_gap_closed_edge_cases_and_markdown():
    assert method_table.gap_closed("zero", 0.1, 0.4) == pytest.approx(0.75)
    assert method_table.gap_closed("zero", 0.8, 0.4) == pytest.approx(-1.0)        # worse than B
    assert method_table.gap_closed("zero", 0.1, 0.0) is None                       # B has no gap
    assert method_table.gap_closed("one", 0.95, 0.9) == pytest.approx(0.5)
    assert method_table.gap_closed("one", 0.9, 1.0) is None and method_table.gap_closed("zero", None, 0.4) is None
    records = [record("gac", 0, sample_mse=0.1), record("uniform", 0, sample_mse=0.2)]
    pairs = method_table.paired(records, [["gac", "uniform"], ["uniform", "rtn"]])
    assert len(pairs) == 1 and pairs[0]["diff"]["sample_mse"]["ci95"] is None     # one seed: no interval
    md = "\n".join(method_table.paired_markdown(pairs))
    assert "## Paired differences" in md and "| tfmq_compat | W4A8 | gac − uniform | 0 |" in md and "0.500" in md
    assert method_table.paired_markdown([]) == []
