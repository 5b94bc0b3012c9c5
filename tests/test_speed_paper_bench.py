"""bench/speed_paper.py end to end on the CPU at its smallest settings (--quick: reduced-width DiT-XL/2)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_speed_paper_quick_writes_rates_and_a_projection(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import speed_paper

    out = tmp_path / "speed.json"
    res = speed_paper.main(["--device", "cpu", "--quick", "--configs", "configs/paper/imagenet_dit_xl2_w4a8.yaml",
                            "--iters", "3", "--meta_iters", "2", "--sample_options", "fp32",
                            "--max_sample_steps", "2", "--out", str(out), "--workdir", str(tmp_path / "work")])
    saved = json.loads(out.read_text())
    assert saved["configs"].keys() == res["configs"].keys() == {"imagenet_dit_xl2_w4a8"}
    entry = saved["configs"]["imagenet_dit_xl2_w4a8"]
    assert entry["status"] == "ok" and entry["model"]["params"] > 0
    cal = entry["calibration"]
    assert cal["status"] == "ok"
    # DiT: transformer blocks (attention kind) and the final adaLN linear; one of each measured
    assert cal["units_total"] == {"attention": 2, "layer": 1}
    assert {u["kind"] for u in cal["measured_units"]} == {"attention", "layer"}
    for u in cal["measured_units"]:
        assert math.isfinite(u["sec_per_iter"]) and u["sec_per_iter"] > 0 and u["iters"] == 3
        assert u["sec_per_meta_step"] > 0 and u["meta_steps"] == 2  # GAC weights every unit but the time unit
        assert u["flops"] > 0
    # the measurement set keeps the paper's validation tuples per kept step (6 of 3,200 / 25 steps)
    assert cal["measurement"]["val_per_step"] == cal["paper"]["val_per_step"] == 6
    proj = cal["projection"]
    assert proj["complete"] and len(proj["units"]) == 3
    assert math.isfinite(proj["total_seconds"]) and proj["total_seconds"] > 0
    assert proj["recon_seconds"] > 0 and proj["meta_seconds"] > 0 and proj["calibration_set_seconds"] > 0
    assert proj["total_seconds"] >= proj["recon_seconds"] + proj["meta_seconds"]
    # sampling: guided (cfg 1.5) DDIM 50 linspace, decoded through the KL autoencoder
    rows = entry["sampling"]["rows"]
    assert [r["option"] for r in rows] == ["fp32"] and rows[0]["status"] == "ok"
    assert rows[0]["img_per_s"] > 0 and rows[0]["finite"] and rows[0]["model_batch"] == 2 * rows[0]["batch"]
    assert rows[0]["image_shape"] == [3, 64, 64] and rows[0]["steps"] == 50 and rows[0]["steps_measured"] == 2
    md = out.with_suffix(".md").read_text()
    assert "| imagenet_dit_xl2_w4a8 |" in md and saved["git_commit"] in md
    assert saved["command"].startswith("python bench/speed_paper.py --device cpu --quick")


def test_speed_paper_records_a_failing_unit_and_goes_on(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "bench"))
    import speed_paper

    real = speed_paper.UnitSubset.on_fit_start

    def oom_on_layer_units(self, trainer, module):  # the bench's own callback, as a unit's fit starts
        if module.unit_name == "proj_out_1":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, trainer, module)

    monkeypatch.setattr(speed_paper.UnitSubset, "on_fit_start", oom_on_layer_units)
    out = tmp_path / "speed.json"
    speed_paper.main(["--device", "cpu", "--quick", "--configs", "configs/paper/imagenet_dit_xl2_w4a8.yaml",
                      "--iters", "2", "--meta_iters", "1", "--phases", "calibration", "--out", str(out),
                      "--workdir", str(tmp_path / "work")])
    cal = json.loads(out.read_text())["configs"]["imagenet_dit_xl2_w4a8"]["calibration"]
    assert cal["status"] == "incomplete projection (1 unit(s) failed)"
    assert list(cal["failed_units"]) == ["proj_out_1"] and "out of memory" in cal["failed_units"]["proj_out_1"]
    assert cal["projection"]["unmeasured_kinds_units"] == ["proj_out_1"]
    assert [u["status"] for u in cal["measured_units"] if u["kind"] == "attention"] == ["ok"]
