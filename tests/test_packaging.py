"""The package as users install it: a wheel built from this tree, installed into a fresh venv, used from elsewhere."""
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "checkpoints" / "default"
SOURCES = ("setup.cfg", "pyproject.toml", "README.md")  # what setuptools reads besides the gaq/ package

SMOKE = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    import gaq
    from gaq.models.loading import load_denoiser
    from gaq.quant import available_presets

    assert Path(gaq.__file__).resolve().is_relative_to(Path(sys.prefix).resolve()), gaq.__file__
    assert {"tfmq_compat", "qdiff_compat", "brecq_compat"} <= set(available_presets())
    gaq.QuantConfig()  # the default preset resolves from the installed package
    den = load_denoiser(sys.argv[1])
    qmodel = gaq.quantize(den.model, gaq.QuantConfig(w_bits=4, a_bits=32, preset="brecq_compat"))
    x, t, labels = torch.randn(2, *den.sample_shape), torch.tensor([900, 10]), torch.tensor([1, 2])
    with torch.no_grad():
        out = qmodel(x, t, class_labels=labels).sample
    qmodel.save_pretrained("q")
    with torch.no_grad():
        back = gaq.from_pretrained("q")(x, t, class_labels=labels).sample
    assert out.shape == x.shape and bool(torch.isfinite(out).all()) and torch.equal(back, out)
    # a smoke calibration through the verb: uniform reconstruction of the ResBlocks on batches made here
    from gaq.calib.recon import ReconConfig
    from gaq.data.datamodule import SplitConfig
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, *den.sample_shape, generator=g), torch.full((8,), step), {"class_labels": torch.arange(8)})
               for step in (900, 500)]
    cfg = gaq.CalibrationConfig(method="uniform", quant=gaq.QuantConfig(w_bits=4, a_bits=8), units=["kind:resnet"],
                                split=SplitConfig(val_fraction=0.25, num_groups=2),
                                recon=ReconConfig(iters=2, batch_size=4, ckpt_every=0, cache_batch=16))
    calibrated = gaq.calibrate(den, cfg, batches, run_dir="run",
                               trainer={"accelerator": "cpu", "devices": 1, "enable_progress_bar": False})
    assert Path("run/summary.json").is_file() and calibrated.gaq_summary["method"] == "uniform"
    print("smoke ok")
""")


def test_wheel_ships_the_presets_and_quantizes_from_a_fresh_venv(tmp_path):
    src = tmp_path / "src"  # a copy, so that the build leaves no build/ or egg-info in the working tree
    shutil.copytree(REPO / "gaq", src / "gaq", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in SOURCES:
        shutil.copy2(REPO / name, src / name)
    run = dict(check=True, capture_output=True, text=True, timeout=120)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(tmp_path / "dist"), str(src)], **run)
    wheel, = (tmp_path / "dist").glob("gaq-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], **run)
    python = venv / "bin" / "python"
    # The dependencies (torch, diffusers, ...) come from this interpreter's site-packages. Put on the
    # path as a plain entry, its .pth files (among them this checkout's editable install) are not run.
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               **run).stdout.strip())
    (site / "_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "-q", str(wheel)], **run)

    work = tmp_path / "elsewhere"
    work.mkdir()
    out = subprocess.run([str(python), "-c", SMOKE, str(DIGITS)], cwd=work, **run)
    assert "smoke ok" in out.stdout
