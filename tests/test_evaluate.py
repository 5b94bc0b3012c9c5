"""`gaq evaluate` and its pieces on a tiny real model: reference-statistics cache, seeded sampling,
the per-step error, the callbacks (evaluate and calibration-end paths), the command end to end on
the FP model and on a `gaq calibrate` run, and the method table at tiny settings."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tiny_unet
from diffusers import DDPMScheduler
from PIL import Image

from gaq.cli import main as gaq_main
from gaq.calib.driver import calibration_end
from gaq.errors import GaqError
from gaq.eval.callbacks import MetricsCallback, SampleGridCallback
from gaq.eval.generation import Conditioning, SamplingConfig, generate
from gaq.eval.reference import ReferenceConfig, load_reference_images, reference_stats
from gaq.eval.metrics import ClassifierExtractor, MetricsConfig, save_stats
from gaq.models.sampling import SamplerConfig
from gaq.eval.timestep_error import TimestepErrorConfig, timestep_error
from gaq.toy.classifier import ClassifierConfig, DigitClassifier, save_classifier
from gaq.models.loading import Denoiser, load_denoiser, save_denoiser
from gaq.quant import QuantConfig, quantize_rtn

ROOT = Path(__file__).resolve().parents[1]
SAMPLER = SamplerConfig(steps=4, guidance_scale=2.0)


def small_classifier(seed: int = 0) -> DigitClassifier:
    torch.manual_seed(seed)
    return DigitClassifier(ClassifierConfig(channels=(8, 16), feature_dim=16))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The tiny class-conditional UNet (10 classes + null) with a digit classifier in classifier/."""
    folder = tmp_path_factory.mktemp("tiny_eval_model")
    sched = DDPMScheduler(num_train_timesteps=1000)
    save_denoiser(Denoiser(make_tiny_unet(), sched.alphas_cumprod, (1, 16, 16), "class", 10, 10), folder, sched)
    save_classifier(small_classifier(), folder / "classifier")
    return folder


@pytest.fixture(scope="module")
def den(model_dir) -> Denoiser:
    return load_denoiser(model_dir)


def test_reference_cache_is_reused_when_it_matches_and_recomputed_when_not(tmp_path):
    cfg = ReferenceConfig(cache_dir=str(tmp_path / "cache"), max_images=120)
    ex = ClassifierExtractor(small_classifier())
    first, info = reference_stats(cfg, ex, (1, 16, 16), batch_size=50)
    assert info["cache"] == "miss" and info["count"] == 120 and Path(info["file"]).is_file()
    again, info2 = reference_stats(cfg, ex, (1, 16, 16), batch_size=50)
    assert info2["cache"] == "hit" and info2["file"] == info["file"]
    assert torch.equal(again.features, first.features) and torch.equal(again.spatial, first.spatial)
    # another feature network, another reference split or size: other statistics, recomputed
    other_net, info3 = reference_stats(cfg, ClassifierExtractor(small_classifier(seed=1)), (1, 16, 16), 50)
    assert info3["cache"] == "miss" and info3["file"] != info["file"]
    assert not torch.allclose(other_net.features, first.features)
    held, info4 = reference_stats(ReferenceConfig(cache_dir=cfg.cache_dir, split="held_out"), ex, (1, 16, 16), 50)
    assert info4["cache"] == "miss" and len(held) == 270           # 15% of the 1,797 digits
    # a cache file whose metadata does not match (tampered / stale) is recomputed, not trusted
    save_stats(info["file"], first, {"reference": {"kind": "something else"}, "extractor": ex.identity()})
    fixed, info5 = reference_stats(cfg, ex, (1, 16, 16), batch_size=50)
    assert info5["cache"] == "miss" and torch.equal(fixed.features, first.features)
    assert reference_stats(cfg, ex, (1, 16, 16), batch_size=50)[1]["cache"] == "hit"
    # no cache dir: computed every time
    assert reference_stats(ReferenceConfig(cache_dir=None, max_images=20), ex, (1, 16, 16), 50)[1]["cache"] == "off"


def test_reference_images_from_a_folder_of_pngs(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray((torch.rand(16, 16) * 255).byte().numpy()).save(folder / f"{i}.png")
    images, ident = load_reference_images(ReferenceConfig(kind="images", path=str(folder)), (1, 16, 16))
    assert images.shape == (3, 1, 16, 16) and images.min() >= -1 and images.max() <= 1
    assert ident["kind"] == "images" and ident["files"] == 3


def test_samples_do_not_depend_on_the_batch_size(den):
    a = SamplingConfig(num_samples=6, batch_size=6, seed=3, sampler=SAMPLER)
    b = SamplingConfig(num_samples=6, batch_size=4, seed=3, sampler=SAMPLER)
    xa = torch.cat([imgs for _, _, imgs in generate(den.model, den, a, progress=False)])
    xb = torch.cat([imgs for _, _, imgs in generate(den.model, den, b, progress=False)])
    torch.testing.assert_close(xa, xb, rtol=1e-4, atol=1e-5)
    c = SamplingConfig(num_samples=6, batch_size=6, seed=4, sampler=SAMPLER)
    xc = torch.cat([imgs for _, _, imgs in generate(den.model, den, c, progress=False)])
    assert not torch.allclose(xa, xc)
    # classes are round-robin, so every class gets the same count
    assert Conditioning.of(den, a).cond_ids(20).bincount().tolist() == [2] * 10


def test_timestep_error_is_zero_for_the_fp_model_and_grows_with_fewer_bits(den):
    cond = Conditioning.of(den, SamplingConfig(sampler=SAMPLER))
    cfg = TimestepErrorConfig(num_samples=4, batch_size=4)
    same = timestep_error(den.model, den.model, den, SAMPLER, cond, cfg, seed=0)
    assert len(same["steps"]) == SAMPLER.steps and same["max_mse"] == 0.0
    w8 = quantize_rtn(den.model, QuantConfig(w_bits=8, a_bits=32), [])
    w4 = quantize_rtn(den.model, QuantConfig(w_bits=4, a_bits=32), [])
    e8 = timestep_error(den.model, w8, den, SAMPLER, cond, cfg, seed=0)
    e4 = timestep_error(den.model, w4, den, SAMPLER, cond, cfg, seed=0)
    assert 0 < e8["mean_mse"] < e4["mean_mse"]
    assert [s["t"] for s in e4["steps"]] == sorted((s["t"] for s in e4["steps"]), reverse=True)


def test_callbacks_write_their_files_after_calibration(tmp_path, model_dir, den):
    qmodel = quantize_rtn(den.model, QuantConfig(w_bits=8, a_bits=32), [])
    sampling = SamplingConfig(num_samples=20, batch_size=20, sampler=SAMPLER)
    metrics = MetricsCallback(features=str(model_dir / "classifier"),
                              reference=ReferenceConfig(cache_dir=str(tmp_path / "cache"), max_images=100),
                              metrics=MetricsConfig(inception="off"), sampling=sampling)
    grid = SampleGridCallback(per_class=3, scale=1, sampling=sampling)
    results = calibration_end([metrics, grid, object()], qmodel, den, tmp_path / "run")
    out = tmp_path / "run" / "calibration_eval"
    written = json.loads((out / "metrics.json").read_text())
    assert written == results["MetricsCallback"]
    m = written["metrics"]
    assert set(m) >= {"fid", "sfid", "precision", "recall", "accuracy", "per_class_accuracy"}
    assert m["fid"] >= 0 and 0 <= m["precision"] <= 1 and len(m["per_class_accuracy"]) == 10
    assert written["samples"]["per_class"] == [2] * 10 and written["reference"]["classifier"]["count"] == 100
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0] == "metric,value" and any(r.startswith("accuracy_class_9,") for r in rows)
    png = Image.open(out / "samples_grid.png")                   # 10 rows of 3 images of 16 px, 1 px padding
    assert png.size == (3 * 17 + 1, 10 * 17 + 1)
    assert results["SampleGridCallback"]["grid"] == str(out / "samples_grid.png")


def test_non_finite_samples_and_prompts_for_a_class_model_get_one_line(tmp_path, model_dir, den):
    """NaN samples stop before any metric (NaN features crash LAPACK inside the Frechet distance), and a
    prompt file given to a class-conditional model is refused instead of ignored."""
    qmodel = quantize_rtn(den.model, QuantConfig(w_bits=8, a_bits=32), [])
    with torch.no_grad():
        next(p for p in qmodel.parameters() if p.ndim == 4).fill_(float("nan"))
    sampling = SamplingConfig(num_samples=10, batch_size=10, sampler=SAMPLER)
    metrics = MetricsCallback(features=str(model_dir / "classifier"),
                              reference=ReferenceConfig(cache_dir=str(tmp_path / "cache"), max_images=100),
                              metrics=MetricsConfig(inception="off"), sampling=sampling)
    with pytest.raises(GaqError, match="hold NaN or Inf") as info:
        calibration_end([metrics], qmodel, den, tmp_path / "run")
    assert "\n" not in str(info.value) and not (tmp_path / "run" / "calibration_eval" / "metrics.json").exists()
    with pytest.raises(GaqError, match="prompts is for text-conditional models and this model is class-conditional"):
        Conditioning.of(den, SamplingConfig(prompts=str(tmp_path / "prompts.txt")))


def write_eval_config(tmp: Path, model_dir: Path) -> Path:
    cfg = {
        "source": str(model_dir), "num_samples": 20, "batch_size": 10, "seed": 0,
        "sampler": {"steps": 5, "guidance_scale": 2.0}, "features": str(model_dir / "classifier"),
        "reference": {"kind": "digits", "cache_dir": str(tmp / "eval_cache"), "max_images": 200},
        "metrics": {"inception": "auto"}, "grid": {"per_class": 2, "scale": 1},
        "timestep_error": {"num_samples": 4, "batch_size": 4},
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
    }
    path = tmp / "evaluate.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def write_calibrate_config(tmp: Path, model_dir: Path, method: str = "rtn") -> Path:
    cfg = {
        "method": method, "quant": {"w_bits": 4, "a_bits": 8, "preset": "tfmq_compat"},
        "data": {"source": str(model_dir), "cache_dir": str(tmp / "calib_sets"),
                 "calib": {"steps": 5, "interval": 1, "samples_per_step": 8, "spacing": "uniform", "batch_size": 8},
                 "split": {"val_fraction": 0.25, "num_groups": 5}},
        "model": {"recon": {"iters": 2, "batch_size": 8, "ckpt_every": 0, "cache_batch": 40}},
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
    }
    path = tmp / f"calibrate-{method}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def last_line(capsys) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_evaluate_fp_and_a_calibrated_run_end_to_end(tmp_path, model_dir, capsys):
    cfg = write_eval_config(tmp_path, model_dir)
    gaq_main(["evaluate", "--config", str(cfg), "--out_dir", str(tmp_path / "fp")])
    out = capsys.readouterr()
    assert out.out.strip().splitlines()[-1] == str(tmp_path / "fp")
    # a log line per sampled batch (batch_size 10 of 20), for runs whose output goes to a file
    assert "sampled 10 of 20 images" in out.out + out.err and "sampled 20 of 20 images" in out.out + out.err
    fp = json.loads((tmp_path / "fp" / "metrics.json").read_text())
    assert fp["model"]["model"] == "fp" and fp["samples"]["count"] == 20 and fp["samples"]["per_class"] == [2] * 10
    assert fp["timestep_error"] is None and any("timestep error skipped" in n for n in fp["notes"])
    assert fp["fidelity"] is None and any(n == "fidelity to FP skipped: no run (FP evaluation)" for n in fp["notes"])
    assert "psnr" not in fp["metrics"] and "fid_to_fp" not in fp["metrics"]
    assert fp["reference"]["classifier"]["cache"] == "miss"
    assert (tmp_path / "fp" / "samples_grid.png").is_file() and (tmp_path / "fp" / "metrics.csv").is_file()

    run = tmp_path / "run"
    gaq_main(["calibrate", "--config", str(write_calibrate_config(tmp_path, model_dir)), "--run_dir", str(run)])
    capsys.readouterr()
    gaq_main(["evaluate", "--config", str(cfg), "--run", str(run)])
    assert last_line(capsys) == str(run / "eval")                # default output folder of a run
    q = json.loads((run / "eval" / "metrics.json").read_text())
    assert q["model"]["model"] == "quantized" and q["model"]["method"] == "rtn"
    assert (q["model"]["w_bits"], q["model"]["a_bits"]) == (4, 8)
    assert q["reference"]["classifier"]["cache"] == "hit"        # same reference and features as the FP run
    for key in ("fid", "sfid", "precision", "recall", "accuracy"):
        assert isinstance(q["metrics"][key], float)
    ts = json.loads((run / "eval" / "timestep_error.json").read_text())
    assert len(ts["steps"]) == 5 and ts["mean_mse"] > 0 and q["timestep_error"]["mean_mse"] == ts["mean_mse"]
    assert ts["num_groups"] == 5 and len(ts["group_mse"]) == 5 and q["timestep_error"]["group_mse"] == ts["group_mse"]
    # fidelity to the FP samples of the same noise: every sample compared, FP samples drawn and cached
    m = q["metrics"]
    assert m["fidelity_samples"] == 20 and q["fidelity"]["num_samples"] == 20
    assert 0 < m["sample_mse"] and 0 < m["psnr"] < 100 and m["psnr_capped"] == 0 and 0 < m["ssim"] < 1
    assert m["psnr_ci95"] > 0 and m["ssim_ci95"] > 0 and m["sample_mse_ci95"] > 0
    assert m["fid_to_fp"] > 0 and m["sfid_to_fp"] > 0
    assert q["fidelity"]["fp_samples"]["cache"] == "miss" and Path(q["fidelity"]["fp_samples"]["file"]).is_file()
    assert not any("fidelity to FP skipped" in n for n in q["notes"])
    rows = (run / "eval" / "metrics.csv").read_text()
    assert "\npsnr," in rows and "\nfid_to_fp," in rows
    # a second evaluation of the run reuses the FP samples and measures the same; a new seed draws new ones
    gaq_main(["evaluate", "--config", str(cfg), "--run", str(run), "--out_dir", str(tmp_path / "again"),
              "--timestep_error.enabled", "false"])
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["fidelity"]["fp_samples"]["cache"] == "hit"
    assert {k: again["metrics"][k] for k in ("psnr", "ssim", "sample_mse", "fid_to_fp")} == \
        {k: m[k] for k in ("psnr", "ssim", "sample_mse", "fid_to_fp")}
    gaq_main(["evaluate", "--config", str(cfg), "--run", str(run), "--out_dir", str(tmp_path / "seed1"),
              "--seed", "1", "--timestep_error.enabled", "false", "--fidelity.num_samples", "10"])
    seed1 = json.loads((tmp_path / "seed1" / "metrics.json").read_text())
    assert seed1["fidelity"]["fp_samples"]["cache"] == "miss" and seed1["metrics"]["fidelity_samples"] == 10
    gaq_main(["evaluate", "--config", str(cfg), "--run", str(run), "--out_dir", str(tmp_path / "off"),
              "--timestep_error.enabled", "false", "--fidelity.enabled", "false"])
    off = json.loads((tmp_path / "off" / "metrics.json").read_text())
    assert off["fidelity"] is None and "psnr" not in off["metrics"]
    assert any(n == "fidelity to FP skipped: fidelity.enabled is false" for n in off["notes"])
    # the deployed form of the same run (integer weights and GEMMs; float32 elsewhere) samples what the
    # fake-quantized model does, up to activation codes that flip at a rounding boundary
    gaq_main(["evaluate", "--config", str(cfg), "--run", str(run), "--out_dir", str(tmp_path / "deployed"),
              "--timestep_error.enabled", "false", "--deploy.dtype", "float32"])
    dep = json.loads((tmp_path / "deployed" / "metrics.json").read_text())
    assert dep["model"]["model"] == "deployed" and dep["model"]["deploy"]["dtype"] == "float32"
    assert dep["fidelity"]["fp_samples"]["cache"] == "hit"
    assert abs(dep["metrics"]["psnr"] - m["psnr"]) < 0.5 and abs(dep["metrics"]["accuracy"] - m["accuracy"]) <= 0.1
    capsys.readouterr()
    assert (run / "eval" / "timestep_error.png").stat().st_size > 0
    # the same seed and sampler: the quantized W4A8 samples differ from the FP ones, but not wildly
    assert q["metrics"] != fp["metrics"]


@pytest.mark.parametrize("args, message", [
    (["--run", "/no/such/run"], "/no/such/run"),
    (["--features", "/no/such/classifier"], "/no/such/classifier"),
    (["--num_samples", "0"], "num_samples"),
    (["--num_samples", "15"], "multiple of the model's 10 classes"),
    (["--sampler.steps", "0"], "sampler steps"),
])
def test_bad_input_gets_one_error_line(tmp_path, model_dir, capsys, args, message):
    cfg = write_eval_config(tmp_path, model_dir)
    with pytest.raises(SystemExit) as exc:
        gaq_main(["evaluate", "--config", str(cfg), "--out_dir", str(tmp_path / "x"), *args])
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert err and message in err[-1]


def test_method_table_at_tiny_settings(tmp_path, model_dir):
    sys.path.insert(0, str(ROOT / "bench"))
    import method_table

    argv = ["--source", str(model_dir), "--methods", "[rtn, uniform]", "--bits", "[W8A8]", "--seeds", "[0, 1]",
            "--extra_presets", "{}", "--iters", "2", "--num_samples", "20", "--in_process", "true",
            "--calibrate_config", str(write_calibrate_config(tmp_path, model_dir)),
            "--evaluate_config", str(write_eval_config(tmp_path, model_dir)),
            "--runs_root", str(tmp_path / "runs"), "--out_dir", str(tmp_path / "results"),
            "--evaluate_args=--grid.per_class 1", "--pairs", "[[uniform, rtn]]"]
    result = method_table.main(argv)
    assert [r["status"] for r in result["runs"]] == ["ok"] * 4 and result["fp"] is not None
    rows = {(r["method"], r["bits"]): r for r in result["rows"]}
    assert set(rows) == {("rtn", "W8A8"), ("uniform", "W8A8")}
    fid = rows[("uniform", "W8A8")]["columns"]["fid"]
    assert fid["n"] == 2 and fid["mean"] == pytest.approx(sum(fid["values"]) / 2)
    assert rows[("rtn", "W8A8")]["columns"]["calibration_seconds"]["n"] == 2
    md = (tmp_path / "results" / "method_table.md").read_text()
    assert "| tfmq_compat | uniform | W8A8 | 0,1 |" in md and "| – | FP |" in md and result["meta"]["git_commit"] in md
    saved = json.loads((tmp_path / "results" / "method_table.json").read_text())
    assert saved["meta"]["eval_device"] == "cpu" and len(saved["runs"]) == 4
    assert result["fp"]["command"].endswith("--grid.per_class 1")          # arguments passed through
    # seeds reach the calibration: the two seeds' calibration sets differ, so do their runs
    assert len({r["run_dir"] for r in result["runs"]}) == 4
    # the fidelity columns and the paired section: uniform vs rtn over the two shared seeds
    assert rows[("uniform", "W8A8")]["columns"]["psnr"]["n"] == 2 and rows[("rtn", "W8A8")]["columns"]["fid_to_fp"]["n"] == 2
    [pair] = result["paired"]
    assert (pair["a"], pair["b"], pair["bits"], pair["seeds"]) == ("uniform", "rtn", "W8A8", [0, 1])
    runs = {(r["method"], r["seed"]): r for r in result["runs"]}
    assert pair["diff"]["sample_mse"]["values"] == pytest.approx(
        [runs[("uniform", s)]["sample_mse"] - runs[("rtn", s)]["sample_mse"] for s in (0, 1)])
    assert pair["gap_closed"]["sample_mse"]["n"] == 2 and "## Paired differences" in md
    assert saved["paired"][0]["gap_closed"]["psnr"]["same_as"] == "sample_mse"
    # a second call reuses every run and evaluation
    again = method_table.main(argv)
    assert all(r["calibration_reused"] for r in again["runs"])
    assert [r["fid"] for r in again["runs"]] == [r["fid"] for r in result["runs"]]


def test_method_table_rows_include_the_qdiff_preset_for_reconstruction_methods():
    sys.path.insert(0, str(ROOT / "bench"))
    import method_table

    specs = method_table.run_specs(method_table.TableConfig(seeds=[0]))
    rows = {(s.preset, s.method, s.bits) for s in specs}
    assert len(specs) == 3 * 3 + 2 * 3
    assert ("qdiff_compat", "gac", "W4A8") in rows and ("qdiff_compat", "rtn", "W4A8") not in rows
    assert method_table.parse_bits("W4A32") == (4, 32)


@pytest.mark.parametrize("args, message", [
    (["--num_samples", "-3"], "num_samples must be >= 1"),
    (["--no_such_key", "1"], "unrecognized arguments: --no_such_key"),
    (["--config", "EMPTY"], "is empty or not a mapping"),
])
def test_evaluate_bad_input_gets_one_line(tmp_path, capsys, args, message):
    import gaq.cli

    empty = tmp_path / "empty.yaml"
    empty.write_text("\n")
    argv = ["evaluate", "--config", "configs/default/evaluate.yaml", *[str(empty) if a == "EMPTY" else a for a in args]]
    with pytest.raises(SystemExit) as info:
        gaq.cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
