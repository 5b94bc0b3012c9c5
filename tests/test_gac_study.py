"""bench/gac_study.py and method_table's named variants: argument building, the Adam reach bound, the verdicts
and the report on synthetic tables (the study itself runs on a GPU)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import gac_study as gs  # noqa: E402
import method_table as mt  # noqa: E402

from gaq.errors import GaqError  # noqa: E402


def test_a_variant_adds_its_arguments_after_the_common_ones_and_keeps_other_runs_unchanged():
    plain = mt.TableConfig(methods=["uniform", "gac"], calibrate_args="--model.recon.iters 7")
    cfg = mt.TableConfig(methods=["uniform", "gac", "gac@carry"], calibrate_args="--model.recon.iters 7",
                         variants={"carry": "--gac.meta_lr 5e-3 --gac.carry_over true"}, pairs=[["gac@carry", "uniform"]])
    specs = mt.run_specs(cfg)
    assert [s.method for s in specs if s.bits == "W4A8" and s.seed == 0] == ["uniform", "gac", "gac@carry", "uniform", "gac"]
    carry = next(s for s in specs if s.method == "gac@carry")
    args = mt.calibrate_args(cfg, carry)
    assert args[args.index("--method") + 1] == "gac"
    assert args[-4:] == ["--gac.meta_lr", "5e-3", "--gac.carry_over", "true"]
    # the variant and its method share the seeds (same calibration set and split), not the run folder
    gac = next(s for s in specs if s.method == "gac" and s.bits == carry.bits and s.seed == carry.seed)
    common = mt.calibrate_args(cfg, gac)
    assert args[: len(common)] == common
    assert mt.run_dir_of(cfg, carry) != mt.run_dir_of(cfg, gac)
    # runs without a variant keep the folder they had before variants existed
    assert mt.run_dir_of(cfg, gac) == mt.run_dir_of(plain, gac)


def test_unknown_variants_and_pairs_are_refused_in_one_line():
    with pytest.raises(GaqError, match="does not define"):
        mt.run_specs(mt.TableConfig(methods=["gac@nope"], pairs=[]))
    with pytest.raises(GaqError, match="--pairs entry"):
        mt.run_specs(mt.TableConfig(methods=["uniform", "gac"], pairs=[["gac@carry", "uniform"]]))


def test_adam_reach_is_the_meta_lr_times_the_steps():
    """Adam's step on a consistently signed gradient is the learning rate: at the paper's settings the
    logits move at most 7.5e-3 and the weights stay within about 1.5% of each other."""
    paper = gs.adam_reach(5e-6, 1500)
    assert paper["max_move"] == pytest.approx(7.5e-3, rel=1e-3)
    assert paper["max_min_ratio"] == pytest.approx(math.exp(2 * 7.5e-3), rel=1e-4)
    fast = gs.adam_reach(5e-3, 150, tau=0.5)
    assert fast["max_move"] == pytest.approx(0.75, rel=1e-3)
    assert fast["max_min_ratio"] == pytest.approx(math.exp(2 * 0.75 / 0.5), rel=1e-3)


@pytest.mark.parametrize("mean, ci, want", [(0.7, 0.05, "aim"), (0.4, 0.1, "effective"), (0.4, 0.5, "no"),
                                            (0.1, 0.05, "no"), (-0.2, 0.1, "no"), (None, None, "–")])
def test_verdict_bars(mean, ci, want):
    assert gs.verdict({"mean": mean, "ci95": ci}) == want


def test_table_argv_parses_with_the_method_tables_parser():
    cfg = gs.StudyConfig(testbeds=["digits"], bits=["W3A8"], seeds=[0, 1], variants={"paper": "", "carry": "--gac.carry_over true"},
                         iters=50, accelerator="cpu", calibrate_args="--trainer.enable_progress_bar false")
    argv = gs.table_argv(cfg, "digits", gs._default_testbeds()["digits"])
    ns = mt.build_parser().parse_args(argv)
    assert ns.methods == ["rtn", "uniform", "gac@paper", "gac@carry"]
    assert ns.pairs == [["gac@paper", "uniform"], ["gac@carry", "uniform"]]
    assert ns.variants == {"paper": "", "carry": "--gac.carry_over true"} and ns.iters == 50 and ns.extra_presets == {}
    assert ns.name == "gac_study_digits" and ns.calibrate_args == "--trainer.enable_progress_bar false"
    mt.run_specs(mt.TableConfig(**{k: ns[k] for k in mt.TableConfig.__dataclass_fields__}))
    # another study name keeps an earlier study's tables
    renamed = mt.build_parser().parse_args(gs.table_argv(gs.StudyConfig(**{**vars(cfg), "name": "w3"}), "digits",
                                                         gs._default_testbeds()["digits"]))
    assert renamed.name == "w3_digits"


def test_report_on_a_synthetic_table():
    gap = {"sample_mse": {"mean": 0.45, "ci95": 0.1}, "ssim": {"mean": 0.2, "ci95": 0.3},
           "fid_to_fp": {"mean": -0.1, "ci95": 0.2}, "timestep_mse": {"mean": 0.05, "ci95": 0.01}}
    result = {"meta": {"source": "checkpoints/default", "calibration_device": "cpu", "eval_device": "cpu",
                       "eval_summary": "500 samples"},
              "paired": [{"a": "gac@carry", "b": "uniform", "bits": "W3A8", "seeds": [0, 1, 2], "gap_closed": gap}],
              "runs": []}
    cfg = gs.StudyConfig(testbeds=["digits"], variants={"carry": "--gac.meta_lr 5e-3 --gac.meta_iters 30"})
    text = gs.report(cfg, {"digits": result}, [], ["--testbeds", "[digits]"])
    row = next(line for line in text.splitlines() if line.startswith("| W3A8 | gac@carry"))
    assert "+45% ± 10" in row and "effective" in row and "-10% ± 20" in row
    reach = next(line for line in text.splitlines() if line.startswith("| carry |"))
    assert "| 0.005 | 30 |" in reach and "0.15" in reach  # 30 steps x 5e-3
    assert "1.0151" in text  # the paper's own bound
