"""The timestep-balanced calibration data: train/validation split, timestep groups, seeded DDP-safe loaders.

Split (per kept sampling step, so every kept step is equally represented): the validation part
takes ``max(1, round(val_fraction * N / S))`` tuples of every kept step, picked by the split seed;
the rest is training. Timestep groups: the S kept steps get a group id each (``contiguous`` by
default: G contiguous runs in sampling order, sizes differing by at most one); every tuple inherits
its step's group.

Batches are dicts ``{"x", "t", "step", "cond": dict, "index", "group"}`` where ``index`` is the
tuple's global index into the calibration set (to look up per-sample weights).

Per reconstruction unit, :meth:`CalibrationDataModule.unit_train_dataloader` serves the training
tuples the unit's fit consumes: per Lightning step, the global indices of its iterations' and meta
steps' batches (:class:`UnitSteps`; the unit's cache holds the inputs and targets they index), resumable
mid-epoch (:class:`ResumableSteps`).

Training order: a permutation of the training indices drawn from ``(seed, epoch)``; Lightning calls
``set_epoch`` at every epoch start (also after a resume), so a run resumed at an epoch boundary sees
exactly the order of a straight run. Under DDP every rank gets a disjoint share of each
permutation, the shares together cover it, and every rank gets the same number of batches (so
collectives stay in lockstep).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Iterator, Sequence

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from gaq.data.calibset import CalibrationSet, CalibSetConfig, load_or_generate
from gaq.errors import GaqError, check
from gaq.models.loading import Denoiser


@dataclass
class SplitConfig:
    """How the calibration set is split and grouped.

    Attributes:
        val_fraction: share of the set held out for validation, in (0, 1); the paper's best is 0.05.
        num_groups: G, the number of timestep groups (at most the number of kept steps).
        grouping: name of a function in :data:`GROUPINGS` that maps kept steps to group ids.
        seed: seeds the validation pick and the training shuffle.
    """

    val_fraction: float = 0.05
    num_groups: int = 5
    grouping: str = "contiguous"
    seed: int = 0

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        check(0.0 < self.val_fraction < 1.0, f"split.val_fraction must be in (0, 1), got {self.val_fraction}")
        check(self.num_groups >= 1, f"split.num_groups must be >= 1, got {self.num_groups}")


# A grouping maps the calibration set and G to one group id per kept step (LongTensor[S], values 0..G-1).
GroupingFn = Callable[[CalibrationSet, int], Tensor]
GROUPINGS: dict[str, GroupingFn] = {}


def register_grouping(name: str) -> Callable[[GroupingFn], GroupingFn]:
    """Decorator adding a grouping function under ``name`` (the value of ``split.grouping``)."""

    def add(fn: GroupingFn) -> GroupingFn:
        GROUPINGS[name] = fn
        return fn

    return add


def contiguous_step_groups(num_kept_steps: int, num_groups: int) -> Tensor:
    """G contiguous runs of S kept steps in sampling order, sizes differing by at most one: kept step ``s``
    is in group ``s * G // S`` (LongTensor[S], non-decreasing, every id in 0..G-1 used when G <= S)."""
    return torch.arange(num_kept_steps) * num_groups // num_kept_steps


@register_grouping("contiguous")
def contiguous_groups(calib_set: CalibrationSet, num_groups: int) -> Tensor:
    """:func:`contiguous_step_groups` of the calibration set's kept steps."""
    return contiguous_step_groups(calib_set.num_kept_steps, num_groups)


def check_step_groups(step_groups: Tensor, num_kept_steps: int, num_groups: int) -> Tensor:
    """Validate a per-kept-step group assignment (every group non-empty) and return it as LongTensor[S]."""
    g = torch.as_tensor(step_groups, dtype=torch.long)
    check(g.shape == (num_kept_steps,), f"a timestep grouping must give one group per kept step "
                                        f"({num_kept_steps}), got shape {tuple(g.shape)}")
    check(bool(((g >= 0) & (g < num_groups)).all()), f"timestep group ids must lie in [0, {num_groups})")
    check(len(torch.unique(g)) == num_groups, f"every one of the {num_groups} timestep groups needs a kept step")
    return g


def split_indices(calib_set: CalibrationSet, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Per-kept-step balanced split: ``(train_indices, val_indices)``, both sorted LongTensors.

    Every kept step gives ``max(1, round(val_fraction * N / S))`` tuples to validation, picked by a
    generator seeded with ``seed``.
    """
    N, S = len(calib_set), calib_set.num_kept_steps
    n_val = max(1, round(val_fraction * N / S))
    pos = calib_set.kept_pos
    gen = torch.Generator().manual_seed(seed)
    val = []
    for s in range(S):
        members = torch.nonzero(pos == s).flatten()
        check(n_val < len(members), f"split.val_fraction {val_fraction} leaves no training tuples at kept step "
                                    f"{int(calib_set.kept_steps[s])} ({len(members)} tuples): lower val_fraction")
        val.append(members[torch.randperm(len(members), generator=gen)[:n_val]])
    val_idx = torch.cat(val).sort().values
    is_val = torch.zeros(N, dtype=torch.bool)
    is_val[val_idx] = True
    return torch.nonzero(~is_val).flatten(), val_idx


class CalibrationDataset(Dataset):
    """Batched access to a calibration set: ``dataset[list_of_global_indices]`` is one batch dict."""

    def __init__(self, calib_set: CalibrationSet, group_of: Tensor):
        self.calib_set = calib_set
        self.group_of = group_of

    def __len__(self) -> int:
        return len(self.calib_set)

    def __getitem__(self, idx: Sequence[int] | Tensor) -> dict[str, Any]:
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        cs = self.calib_set
        return {"x": cs.x[idx], "t": cs.t[idx], "step": cs.step[idx], "cond": {k: v[idx] for k, v in cs.cond.items()},
                "index": idx, "group": self.group_of[idx]}


def _as_is(batch: Any) -> Any:
    """Collate function for loaders whose dataset already returns whole batches."""
    return batch


class SeededBatchSampler(DistributedSampler):
    """Yields batches (lists of global indices) of a fixed index set; state is ``(seed, epoch)``.

    With ``shuffle`` the order is a permutation drawn from ``seed + epoch``. The (permuted) indices are
    cut into global batches of ``batch_size * num_replicas``; each global batch is split among the
    ranks (shares differ by at most one), a last global batch too small to give every rank a tuple is
    merged into the one before. So per epoch the ranks' shares are disjoint and cover the indices,
    and every rank yields the same number of non-empty batches.

    It subclasses :class:`DistributedSampler` so Lightning keeps it (no sampler re-injection) and calls
    :meth:`set_epoch` on it; use it as ``DataLoader(dataset, sampler=..., batch_size=None)``.
    """

    def __init__(self, indices: Tensor, batch_size: int, shuffle: bool, seed: int,
                 num_replicas: int = 1, rank: int = 0):
        check(batch_size >= 1, f"batch_size must be >= 1, got {batch_size}")
        check(len(indices) >= num_replicas,
              f"{len(indices)} tuples cannot be shared among {num_replicas} processes: use a larger calibration set")
        super().__init__(indices, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.indices = torch.as_tensor(indices, dtype=torch.long)
        self.batch_size = batch_size

    def _global_batches(self) -> list[Tensor]:
        order = self.indices
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            order = order[torch.randperm(len(order), generator=gen)]
        chunks = list(order.split(self.batch_size * self.num_replicas))
        if len(chunks) > 1 and len(chunks[-1]) < self.num_replicas:
            chunks[-2:] = [torch.cat(chunks[-2:])]
        return chunks

    def __iter__(self) -> Iterator[list[int]]:
        for chunk in self._global_batches():
            yield chunk.tensor_split(self.num_replicas)[self.rank].tolist()

    def __len__(self) -> int:
        n, per = len(self.indices), self.batch_size * self.num_replicas
        full, rest = divmod(n, per)
        return full + (1 if rest >= self.num_replicas or full == 0 else 0)

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])


class IndexStream:
    """Deterministic global batches: batch ``i`` is slice ``i mod nb`` of a permutation of the
    training positions drawn from ``(seed, epoch = i // nb)``; a pure function of ``i``, so resumed
    runs see the same data as straight ones."""

    def __init__(self, train_indices: Tensor, batch_size: int, seed: int, world: int = 1,
                 device: torch.device | str = "cpu"):
        check(batch_size % world == 0, f"batch size {batch_size} must be divisible by the {world} DDP ranks")
        check(len(train_indices) >= batch_size,
              f"batch size {batch_size} is larger than the training split ({len(train_indices)} tuples)")
        self.train_indices, self.batch, self.seed = torch.as_tensor(train_indices), batch_size, seed
        self.device = torch.device(device)
        self.per_epoch = len(train_indices) // batch_size
        self._epoch, self._order = -1, None

    def global_batch(self, i: int) -> Tensor:
        """Global batch ``i`` on :attr:`device` (the permutation is drawn on the CPU, once per epoch)."""
        epoch, pos = divmod(i, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = self.train_indices[torch.randperm(len(self.train_indices), generator=g)]
            self._order, self._epoch = order.to(self.device), epoch
        return self._order[pos * self.batch:(pos + 1) * self.batch]

    def rank_batch(self, i: int, rank: int, world: int) -> Tensor:
        """Rank ``rank``'s share of global batch ``i`` (every ``world``-th element)."""
        return self.global_batch(i)[rank::world]



@dataclass(frozen=True)
class UnitSchedule:
    """The data one unit's fit consumes, Lightning step by Lightning step.

    Attributes:
        iters: reconstruction iterations; ``iters_per_step`` of them per Lightning step.
        recon_batch: global batch of an iteration (split evenly among the DDP ranks); ``seed`` orders them.
        meta_first: meta steps run before the first iteration, ``iters_per_step`` per Lightning step of their own.
        meta_at: interleaved meta steps: how many run just before each iteration (``(iters,)``), or None.
        meta_batch: global batch of a meta step (its own stream, seed ``seed + 1``).
    """

    iters: int
    iters_per_step: int
    recon_batch: int
    seed: int
    meta_first: int = 0
    meta_at: tuple[int, ...] | None = None
    meta_batch: int = 0

    @property
    def meta_steps(self) -> int:
        return self.meta_first + (sum(self.meta_at) if self.meta_at else 0)

    @property
    def first_recon_step(self) -> int:
        """The first Lightning step that runs reconstruction iterations."""
        return -(-self.meta_first // self.iters_per_step)

    @property
    def total_steps(self) -> int:
        return self.first_recon_step + -(-self.iters // self.iters_per_step)


class UnitSteps(Dataset):
    """Item ``j`` is Lightning step ``j`` of a unit's fit (:class:`UnitSchedule`), for one DDP rank: a dict
    ``{"step": j, "iters": (n,) iteration numbers, "recon": (n, b) global calibration indices of those
    iterations, "meta_steps": (m,) the numbers of the meta steps run in the step, "meta": (m, b_meta) their
    indices, "meta_before": (n,) how many of them run just before each iteration}`` (tensors on the CPU). Every item is a pure function of
    ``j``, so a resumed fit sees exactly the data of a straight one."""

    def __init__(self, schedule: UnitSchedule, train_indices: Tensor, rank: int = 0, world: int = 1):
        self.schedule, self.rank, self.world = schedule, rank, world
        self.recon = IndexStream(train_indices, schedule.recon_batch, schedule.seed, world)
        self.meta = (IndexStream(train_indices, schedule.meta_batch, schedule.seed + 1, world)
                     if schedule.meta_steps else None)
        at = torch.tensor(schedule.meta_at or [0] * schedule.iters, dtype=torch.long)
        # meta steps done before iteration i: the leading phase plus the interleaved ones before i
        self._meta_done_before = schedule.meta_first + torch.cat([at.new_zeros(1), at.cumsum(0)])
        self._meta_at = at

    def __len__(self) -> int:
        return self.schedule.total_steps

    def _meta(self, lo: int, hi: int) -> Tensor:
        if self.meta is None or hi <= lo:
            return torch.zeros((0, 0), dtype=torch.long)
        return torch.stack([self.meta.rank_batch(m, self.rank, self.world) for m in range(lo, hi)])

    def iteration_batches(self, first: int):
        """This rank's batch of every iteration from ``first`` on, in order (what a disk cache reads ahead)."""
        return (self.recon.rank_batch(it, self.rank, self.world) for it in range(first, self.schedule.iters))

    def __getitem__(self, j: int) -> dict[str, Any]:
        sch, k = self.schedule, self.schedule.iters_per_step
        if not 0 <= j < sch.total_steps:
            raise IndexError(f"step {j} of a fit of {sch.total_steps} steps")
        if j < sch.first_recon_step:  # the leading meta phase
            lo, hi = j * k, min((j + 1) * k, sch.meta_first)
            iters = torch.zeros(0, dtype=torch.long)
        else:
            first = (j - sch.first_recon_step) * k
            iters = torch.arange(first, min(first + k, sch.iters))
            lo, hi = int(self._meta_done_before[first]), int(self._meta_done_before[first + len(iters)])
        recon = (torch.stack([self.recon.rank_batch(int(it), self.rank, self.world) for it in iters]) if len(iters)
                 else torch.zeros((0, 0), dtype=torch.long))
        return {"step": j, "iters": iters, "recon": recon, "meta": self._meta(lo, hi),
                "meta_steps": torch.arange(lo, hi), "meta_before": self._meta_at[iters]}


class ResumableSteps(torch.utils.data.Sampler[int]):
    """Lightning steps ``start .. total - 1`` of a fit, ``start`` being the steps already done. A Lightning
    checkpoint stores it (``state_dict``: the steps done, read from ``progress`` when it is saved) and the
    resumed fit loads it, so the loader resumes mid-epoch exactly (Lightning's resumable-loader protocol)."""

    def __init__(self, total: int, progress: Callable[[], int]):
        self.total, self.progress, self._start = total, progress, None

    def __iter__(self) -> Iterator[int]:
        start = self.progress() if self._start is None else self._start
        self._start = None
        return iter(range(start, self.total))

    def __len__(self) -> int:
        return self.total  # the epoch's length: Lightning counts the restored steps towards it

    def state_dict(self) -> dict[str, int]:
        return {"steps_done": int(self.progress())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._start = int(state["steps_done"])


class UnitStepLoader(DataLoader):
    """The DataLoader of one unit's fit (items of :class:`UnitSteps`), resumable through its sampler."""

    def __init__(self, steps: UnitSteps, progress: Callable[[], int]):
        super().__init__(steps, sampler=ResumableSteps(len(steps), progress), batch_size=None)

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)


class CalibrationDataModule(LightningDataModule):
    """Calibration data for block reconstruction and GAC, from a model source and a protocol.

    Args:
        source: model folder or hub id, loaded with :func:`gaq.models.loading.load_denoiser` when
            no :class:`Denoiser` is attached.
        calib: how to generate the calibration set.
        split: validation share, timestep groups, seed.
        batch_size: training batch size per process.
        cache_dir: folder of cached calibration sets.
        num_workers: DataLoader worker processes.
        device: where to sample the calibration set: ``auto`` (the Trainer's device if attached,
            else cuda when available, else cpu) or a torch device string.
    """

    def __init__(self, source: str, calib: CalibSetConfig = CalibSetConfig(), split: SplitConfig = SplitConfig(),
                 batch_size: int = 32, cache_dir: str = "calib_sets", num_workers: int = 0, device: str = "auto"):
        super().__init__()
        check(batch_size >= 1, f"data.batch_size must be >= 1, got {batch_size}")
        check(num_workers >= 0, f"data.num_workers must be >= 0, got {num_workers}")
        self.source = source
        self.calib = replace(calib)
        self.split = replace(split)
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self.num_workers = num_workers
        self.device = device
        check(split.num_groups <= calib.num_kept_steps,
              f"split.num_groups ({split.num_groups}) exceeds the {calib.num_kept_steps} kept timesteps "
              f"(calib.steps {calib.steps} / interval {calib.interval}): lower num_groups")
        self.save_hyperparameters({"source": source, "calib": asdict(calib), "split": asdict(split),
                                   "batch_size": batch_size, "cache_dir": cache_dir, "num_workers": num_workers,
                                   "device": device})
        self._denoiser: Denoiser | None = None
        self._calib_set: CalibrationSet | None = None
        self._step_groups_override: Tensor | None = None
        self.calib_path: str | None = None
        self._built = False

    # ----------------------------------------------------------------- injection and lazy loading
    def attach(self, denoiser: Denoiser | None = None, calib_set: CalibrationSet | None = None) -> "CalibrationDataModule":
        """Use an in-memory model and/or calibration set instead of loading ``source`` / the cache."""
        if denoiser is not None:
            self._denoiser = denoiser
        if calib_set is not None:
            self._calib_set = calib_set
            self._built = False
        return self

    @property
    def denoiser(self) -> Denoiser:
        """The FP model (loaded from ``source`` on first use unless attached)."""
        if self._denoiser is None:
            from gaq.models.loading import load_denoiser

            self._denoiser = load_denoiser(self.source)
        return self._denoiser

    @property
    def calib_set(self) -> CalibrationSet:
        check(self._calib_set is not None, "the calibration data is not set up yet: call setup() (or attach a set) first")
        return self._calib_set

    def _sampling_device(self) -> torch.device:
        if self.device != "auto":
            return torch.device(self.device)
        trainer = self.trainer
        if trainer is not None:
            return trainer.strategy.root_device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _load_or_generate(self) -> CalibrationSet:
        cs, path, _ = load_or_generate(self.denoiser, self.calib, self.cache_dir, device=self._sampling_device())
        self.calib_path = str(path)
        return cs

    # ----------------------------------------------------------------- Lightning hooks
    def prepare_data(self) -> None:
        """Generate (or reuse) the cached calibration set; Lightning runs this on local rank 0 only."""
        if self._calib_set is None:
            self._load_or_generate()

    def setup(self, stage: str | None = None) -> None:
        """Load the set (generated by :meth:`prepare_data`) and build the split and groups once."""
        if self._calib_set is None:
            self._calib_set = self._load_or_generate()
        if not self._built:
            self._build()

    def set_step_groups(self, step_groups: Tensor) -> None:
        """Override the grouping with an externally computed group id per kept step (LongTensor[S])."""
        self._step_groups_override = torch.as_tensor(step_groups, dtype=torch.long)
        if self._calib_set is not None:
            self._build()

    def _build(self) -> None:
        cs = self.calib_set
        S, G = cs.num_kept_steps, self.split.num_groups
        check(G <= S, f"split.num_groups ({G}) exceeds the {S} kept timesteps of the calibration set: lower num_groups")
        if self._step_groups_override is not None:
            step_groups = self._step_groups_override
        else:
            fn = GROUPINGS.get(self.split.grouping)
            if fn is None:
                raise GaqError(f"split.grouping {self.split.grouping!r} is unknown; choose one of: {', '.join(GROUPINGS)}")
            step_groups = fn(cs, G)
        self.step_groups = check_step_groups(step_groups, S, G)
        self.group_of = self.step_groups[cs.kept_pos]
        self.train_indices, self.val_indices = split_indices(cs, self.split.val_fraction, self.split.seed)
        self.dataset = CalibrationDataset(cs, self.group_of)
        self._built = True

    # ----------------------------------------------------------------- what the method reads
    @property
    def num_train(self) -> int:
        """Number of training tuples (all ranks together)."""
        return len(self.train_indices)

    @property
    def num_groups(self) -> int:
        return self.split.num_groups

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _loader(self, sampler: SeededBatchSampler) -> DataLoader:
        return DataLoader(self.dataset, sampler=sampler, batch_size=None, collate_fn=_as_is,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; under DDP this rank's disjoint share (same batch count on every rank)."""
        world, rank = self._world()
        return self._loader(SeededBatchSampler(self.train_indices, self.batch_size, shuffle=True,
                                               seed=self.split.seed, num_replicas=world, rank=rank))

    def unit_train_dataloader(self, schedule: UnitSchedule, progress: Callable[[], int], rank: int,
                              world: int) -> UnitStepLoader:
        """The training data of one reconstruction unit's fit (run by its own Trainer, whose ``rank`` of
        ``world`` processes this is): per Lightning step, the global indices of its iterations' and meta
        steps' batches drawn from this split's training tuples (this rank's share), resuming after the
        ``progress()`` steps already done."""
        return UnitStepLoader(UnitSteps(schedule, self.train_indices, rank, world), progress)

    def val_dataloader(self) -> DataLoader:
        """The whole validation set in index order, on every rank (not sharded)."""
        return self._loader(SeededBatchSampler(self.val_indices, self.batch_size, shuffle=False, seed=self.split.seed))

    def val_batches_by_group(self, device: torch.device | str | None = None) -> list[dict[str, Any]]:
        """The whole validation set as one batch dict per timestep group (list index = group id)."""
        out = []
        for g in range(self.num_groups):
            idx = self.val_indices[self.group_of[self.val_indices] == g]
            batch = self.dataset[idx]
            if device is not None:
                batch = to_device(batch, torch.device(device))
            out.append(batch)
        return out

    def group_sizes(self) -> dict[str, list[int]]:
        """Training and validation tuples per group (for logging)."""
        G = self.num_groups
        return {"train": torch.bincount(self.group_of[self.train_indices], minlength=G).tolist(),
                "val": torch.bincount(self.group_of[self.val_indices], minlength=G).tolist()}

    def steps_per_epoch(self) -> int:
        """Training batches per epoch on each rank."""
        world, rank = self._world()
        return len(SeededBatchSampler(self.train_indices, self.batch_size, True, self.split.seed, world, rank))


def to_device(batch: Any, device: torch.device) -> Any:
    """A batch (tensors, possibly in nested dicts such as ``cond``) on ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch
