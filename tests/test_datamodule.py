"""The calibration DataModule: balanced split, timestep groups, seeded loaders, resume order, DDP shards."""
import json

import lightning as L
import pytest
import torch
from torch import nn

from conftest import NUM_CLASSES, make_tiny_unet
from gaq.data.calibset import CalibrationSet, CalibSetConfig, generate_calibration_set
from gaq.data.datamodule import (GROUPINGS, CalibrationDataModule, SeededBatchSampler, SplitConfig,
                                 contiguous_groups, register_grouping)
from gaq.cli import destroy_process_group_at_exit
from gaq.errors import GaqError
from gaq.models.loading import Denoiser

# kept steps 0, 2, 4, 6, 8 (S = 5); guided with both CFG halves: 5 * 2 * 16 = 160 tuples
CALIB = CalibSetConfig(steps=10, interval=2, samples_per_step=16, batch_size=16, guidance_scale=2.0)


@pytest.fixture(scope="module")
def den():
    from diffusers import DDPMScheduler

    return Denoiser(make_tiny_unet(), DDPMScheduler().alphas_cumprod, (1, 16, 16), "class",
                    num_classes=NUM_CLASSES, null_label=NUM_CLASSES, source="tiny-unet")


@pytest.fixture(scope="module")
def calib_set(den):
    return generate_calibration_set(den, CALIB, progress=False)


def make_dm(calib_set, batch_size=8, **split) -> CalibrationDataModule:
    dm = CalibrationDataModule("tiny-unet", calib=CALIB, split=SplitConfig(**split), batch_size=batch_size)
    dm.attach(calib_set=calib_set)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("val_fraction, per_step", [(0.05, 2), (0.2, 6), (0.001, 1)])
def test_split_is_balanced_per_kept_step(calib_set, val_fraction, per_step):
    dm = make_dm(calib_set, val_fraction=val_fraction)
    N = len(calib_set)
    assert per_step == max(1, round(val_fraction * N / 5))
    val_steps = calib_set.step[dm.val_indices]
    assert torch.bincount(calib_set.kept_pos[dm.val_indices], minlength=5).tolist() == [per_step] * 5
    assert set(val_steps.tolist()) == {0, 2, 4, 6, 8}
    both = torch.cat([dm.train_indices, dm.val_indices])
    assert len(both) == N and torch.equal(both.sort().values, torch.arange(N))  # disjoint and covering
    assert dm.num_train == N - 5 * per_step


@pytest.mark.parametrize("G, expected", [(1, [0] * 5), (2, [0, 0, 0, 1, 1]), (3, [0, 0, 1, 1, 2]),
                                         (5, [0, 1, 2, 3, 4])])
def test_groups_contiguous_and_covering(calib_set, G, expected):
    dm = make_dm(calib_set, num_groups=G)
    assert dm.step_groups.tolist() == expected
    assert torch.equal(dm.group_of, dm.step_groups[calib_set.kept_pos])
    by_group = dm.val_batches_by_group()
    assert len(by_group) == G
    seen = torch.cat([b["index"] for b in by_group]).sort().values
    assert torch.equal(seen, dm.val_indices)  # the whole validation set, each tuple once
    for g, batch in enumerate(by_group):
        assert bool((batch["group"] == g).all())
        assert torch.equal(batch["x"], calib_set.x[batch["index"]])
    sizes = dm.group_sizes()
    assert sum(sizes["train"]) == dm.num_train and sum(sizes["val"]) == len(dm.val_indices)


def test_contiguous_groups_any_size():
    for S in range(1, 25):
        cs = CalibrationSet(x=torch.zeros(S, 1, 2, 2), t=torch.zeros(S, dtype=torch.long), step=torch.arange(S), cond={},
                            kept_steps=torch.arange(S), timesteps=torch.zeros(S, dtype=torch.long))
        for G in range(1, S + 1):
            g = contiguous_groups(cs, G)
            sizes = torch.bincount(g, minlength=G)
            assert bool((g.diff() >= 0).all()) and g[0] == 0 and g[-1] == G - 1  # contiguous runs in order
            assert sizes.min() >= 1 and sizes.max() - sizes.min() <= 1


def test_batches_and_seeded_order(calib_set):
    dm = make_dm(calib_set, batch_size=8)
    batches = list(dm.train_dataloader())
    assert len(batches) == dm.steps_per_epoch() == -(-dm.num_train // 8)
    b = batches[0]
    assert set(b) == {"x", "t", "step", "cond", "index", "group"}
    assert b["x"].shape == (8, 1, 16, 16) and b["cond"]["class_labels"].shape == (8,)
    for key in ("x", "t", "step"):
        assert torch.equal(b[key], getattr(calib_set, key)[b["index"]])
    assert torch.equal(b["group"], dm.group_of[b["index"]])
    order = torch.cat([b["index"] for b in batches])
    assert torch.equal(order.sort().values, dm.train_indices)
    assert set(order.tolist()).isdisjoint(dm.val_indices.tolist())

    again = torch.cat([b["index"] for b in make_dm(calib_set, batch_size=8).train_dataloader()])
    assert torch.equal(order, again)  # same seed: same split and same order
    other = make_dm(calib_set, batch_size=8, seed=1)
    assert not torch.equal(other.val_indices, dm.val_indices)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    epoch1 = torch.cat([b["index"] for b in loader])
    assert not torch.equal(epoch1, order) and torch.equal(epoch1.sort().values, order.sort().values)
    val = torch.cat([b["index"] for b in dm.val_dataloader()])
    assert torch.equal(val, dm.val_indices)


@pytest.mark.parametrize("n, world, batch", [(35, 2, 4), (35, 3, 4), (9, 4, 2), (5, 2, 8), (64, 2, 8)])
def test_sampler_shards_disjoint_covering_lockstep(n, world, batch):
    idx = torch.arange(100, 100 + n)
    for epoch in (0, 3):
        shards = []
        for rank in range(world):
            s = SeededBatchSampler(idx, batch, shuffle=True, seed=7, num_replicas=world, rank=rank)
            s.set_epoch(epoch)
            shards.append(list(s))
            assert len(shards[-1]) == len(s)
            assert all(len(b) >= 1 for b in shards[-1])
        assert len({len(sh) for sh in shards}) == 1  # same number of batches on every rank
        flat = [i for sh in shards for b in sh for i in b]
        assert sorted(flat) == idx.tolist()  # disjoint and covering


def test_bad_inputs(calib_set):
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(GaqError, match="val_fraction"):
            SplitConfig(val_fraction=bad)
    with pytest.raises(GaqError, match="num_groups"):
        CalibrationDataModule("x", calib=CALIB, split=SplitConfig(num_groups=6))
    dm = CalibrationDataModule("x", calib=CALIB, split=SplitConfig(grouping="nope"))
    with pytest.raises(GaqError, match="grouping"):
        dm.attach(calib_set=calib_set).setup()
    dm = CalibrationDataModule("x", calib=CALIB, split=SplitConfig(val_fraction=0.99))
    with pytest.raises(GaqError, match="no training tuples"):
        dm.attach(calib_set=calib_set).setup()


def test_grouping_extension_points(calib_set):
    @register_grouping("test_alternating")
    def alternating(cs, G):
        return torch.arange(cs.num_kept_steps) % G

    try:
        dm = make_dm(calib_set, num_groups=2, grouping="test_alternating")
        assert dm.step_groups.tolist() == [0, 1, 0, 1, 0]
    finally:
        GROUPINGS.pop("test_alternating")
    dm.set_step_groups(torch.tensor([1, 1, 0, 0, 0]))
    assert torch.equal(dm.group_of, torch.tensor([1, 1, 0, 0, 0])[calib_set.kept_pos])
    with pytest.raises(GaqError, match="every one"):
        dm.set_step_groups(torch.tensor([0, 0, 0, 0, 0]))


def test_prepare_and_setup_through_the_cache(den, calib_set, tmp_path):
    dm = CalibrationDataModule("tiny-unet", calib=CALIB, cache_dir=str(tmp_path), device="cpu")
    dm.attach(denoiser=den)
    dm.prepare_data()
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"
    dm.setup("fit")
    assert dm.calib_path == str(files[0])
    assert torch.equal(dm.calib_set.x, calib_set.x)
    assert dm.calib_set.meta["key"] in files[0].name


class IndexRecorder(L.LightningModule):
    """Records, per epoch, the calibration-set indices this rank trained on, to ``out/rank<r>.json``."""

    def __init__(self, out: str):
        super().__init__()
        self.out = out
        self.w = nn.Parameter(torch.zeros(()))
        self.seen: dict[int, list[int]] = {}

    def training_step(self, batch, batch_idx):
        self.seen.setdefault(self.current_epoch, []).extend(batch["index"].tolist())
        return (self.w - batch["x"].mean()) ** 2

    def setup(self, stage):
        destroy_process_group_at_exit()  # in each ddp_spawn worker: a gloo group left to shutdown may abort it

    def on_train_end(self):
        self.seen["sampler"] = type(self.trainer.train_dataloader.sampler).__name__  # not replaced by Lightning
        with open(f"{self.out}/rank{self.global_rank}.json", "w") as f:
            json.dump(self.seen, f)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(root, **kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", default_root_dir=str(root), logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, **kw)


def test_resume_at_epoch_boundary_reproduces_order(calib_set, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _trainer(tmp_path / "a", devices=1, max_epochs=3, enable_checkpointing=False).fit(
        IndexRecorder(str(tmp_path / "a")), datamodule=make_dm(calib_set))
    straight = json.loads((tmp_path / "a" / "rank0.json").read_text())
    _trainer(tmp_path / "b", devices=1, max_epochs=2).fit(IndexRecorder(str(tmp_path / "b")), datamodule=make_dm(calib_set))
    ckpt = next((tmp_path / "b").rglob("*.ckpt"))
    _trainer(tmp_path / "b", devices=1, max_epochs=3).fit(IndexRecorder(str(tmp_path / "b")), datamodule=make_dm(calib_set),
                                                          ckpt_path=str(ckpt))
    resumed = json.loads((tmp_path / "b" / "rank0.json").read_text())
    assert sorted(resumed) == ["2", "sampler"] and resumed["2"] == straight["2"]
    assert straight["1"] != straight["2"]


def test_ddp_shards_disjoint_and_covering(calib_set, tmp_path):
    dm = make_dm(calib_set, batch_size=8, val_fraction=0.02)  # 155 training tuples: 78 + 77, 10 batches a rank
    trainer = _trainer(tmp_path, devices=2, strategy="ddp_spawn", max_epochs=2, enable_checkpointing=False)
    trainer.fit(IndexRecorder(str(tmp_path)), datamodule=dm)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    train = dm.train_indices.tolist()
    assert dm.num_train == 155 and ranks[0]["sampler"] == ranks[1]["sampler"] == "SeededBatchSampler"
    for epoch in ("0", "1"):
        a, b = ranks[0][epoch], ranks[1][epoch]
        assert set(a).isdisjoint(b) and sorted(a + b) == train
    assert ranks[0]["0"] != ranks[0]["1"]  # a new order every epoch


def test_unit_steps_serve_every_iteration_and_meta_step_once_in_order(calib_set):
    """The per-unit loader: item j is Lightning step j (meta steps first or interleaved, K iterations per
    step), each rank's rows are its share of the seeded global batches, and the loader resumes from the
    steps done, through Lightning's resumable-loader state."""
    from gaq.data.datamodule import IndexStream, UnitSchedule, UnitSteps
    dm = make_dm(calib_set)
    interleaved = UnitSchedule(iters=10, iters_per_step=4, recon_batch=8, seed=3, meta_at=(1, 0, 0, 1, 0, 0, 1, 0, 0, 0),
                               meta_batch=6)
    first = UnitSchedule(iters=10, iters_per_step=4, recon_batch=8, seed=3, meta_first=5, meta_batch=6)
    stream = IndexStream(dm.train_indices, 8, 3, 2)
    for sch in (interleaved, first):
        for rank in (0, 1):
            items = list(UnitSteps(sch, dm.train_indices, rank, 2))
            assert [it["step"] for it in items] == list(range(sch.total_steps))
            assert torch.cat([it["iters"] for it in items]).tolist() == list(range(10))
            assert torch.cat([it["meta_steps"] for it in items]).tolist() == list(range(sch.meta_steps))
            rows = torch.cat([it["recon"] for it in items if len(it["iters"])])
            assert torch.equal(rows, torch.stack([stream.rank_batch(i, rank, 2) for i in range(10)]))
            assert all(len(it["meta"]) == len(it["meta_steps"]) and it["meta"].shape[1:] in ((3,), (0,)) for it in items)
    assert sum(it["meta_before"].sum() for it in UnitSteps(interleaved, dm.train_indices)) == 3
    assert [len(it["iters"]) for it in UnitSteps(first, dm.train_indices)] == [0, 0, 4, 4, 2]

    done = [0]
    loader = dm.unit_train_dataloader(first, lambda: done[0], 0, 1)
    assert len(loader) == first.total_steps and [b["step"] for b in loader] == list(range(5))
    done[0] = 3
    state = loader.state_dict()
    assert state == {"steps_done": 3}
    resumed = dm.unit_train_dataloader(first, lambda: 0, 0, 1)
    resumed.load_state_dict(state)
    assert [b["step"] for b in resumed] == [3, 4]
