"""`ShardLoader`: streams WebDataset shards into fixed-size batches, equal per rank, exactly resumable.

How an epoch is planned (all ranks compute the same plan from the shard counts, no communication):

1. Shards are permuted with `(seed, epoch)` and laid end to end as one sequence of T samples.
2. Rank r takes the contiguous range [r*T//W, (r+1)*T//W): whole shards plus at most two partial
   ones at the range's ends. Every rank thus gets exactly T//W samples, so `len(loader)` is the same
   everywhere, which ZeRO-3 needs (a rank with one batch fewer hangs the others). With
   `resampled=True` each rank instead draws whole shards with replacement until it has T//W samples.
3. Each contiguous slice of a shard is a "piece". A piece has its own shuffle buffer seeded by
   `(seed, epoch, rank, piece)`, so its output order does not depend on which worker reads it.
4. DataLoader workers take pieces round-robin and interleave a few at a time to mix shards.
   The main process re-cuts the workers' chunks into batches of exactly `batch_size`.

Exact resume: the loader counts, per piece, how many of its outputs went into delivered batches.
Batches arrive in order and each piece's order is fixed, so that count is a prefix; a restored
loader skips those prefixes (reading but not decoding them) and yields exactly the rest of the
epoch, whatever the new number of workers. Augmentations resume too: every sample's transform runs
with the global torch/numpy/`random` RNGs seeded from (seed, epoch, rank, piece, position in piece),
so a sample gets the same crop, flip and mask however many workers read it and whether or not the
samples before it were decoded. Samples that fail to decode, or whose label a classifier cannot
use (`num_classes`), are skipped and counted; if that leaves a rank short, its last batches are
topped up with samples it already yielded this epoch (counted in `padded`), so batch counts stay equal.
The counts resume exactly as well: each chunk tells how far into each piece the errors it carries
reach, and a restored loader counts only errors beyond that, whatever the new number of workers.

Elastic resume (`load_elastic_states`): the states of all N ranks of a run give the rest of their
epoch, which `data.elastic` re-cuts into equal shares for M ranks; then epochs are planned for M.
"""
import hashlib
import logging
import os
import random
from collections import Counter, deque
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import elastic
from .elastic import Piece
from .index import expand_urls, shard_counts
from .shards import DEFAULT_MAX_PIXELS, WarningLimiter, decode_sample, iter_tar_samples, open_shard

log = logging.getLogger("data")

_META = ("__pos__", "__corrupt__")


def plan_epoch(counts: list[int], epoch: int, seed: int, rank: int, world_size: int,
               resampled: bool = False) -> list[tuple[int, int, int]]:
    """This rank's pieces for one epoch as (shard index, first sample, end sample), in reading order."""
    per_rank = sum(counts) // world_size
    if resampled:
        rng = np.random.default_rng([seed, epoch, rank, 1])
        pieces, left = [], per_rank
        nonempty = [i for i, c in enumerate(counts) if c > 0]
        while left > 0:
            i = int(nonempty[rng.integers(len(nonempty))])
            take = min(left, counts[i])
            pieces.append((i, 0, take))
            left -= take
        return pieces
    order = np.random.default_rng([seed, epoch, 0]).permutation(len(counts))
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    pieces, pos = [], 0
    for i in order:
        c = counts[i]
        a, b = max(lo, pos), min(hi, pos + c)
        if a < b:
            pieces.append((int(i), a - pos, b - pos))
        pos += c
        if pos >= hi:
            break
    return pieces


def _sample_seed(seeds: tuple[int, int, int], piece: int, pos: int) -> int:
    """64-bit seed of one sample's augmentations, from (seed, epoch, rank), its piece and its position there."""
    return int.from_bytes(hashlib.blake2b(f"{seeds}-{piece}-{pos}".encode(), digest_size=8).digest(), "little")


def _seed_rngs(seed: int) -> None:
    """Seed torch's CPU, numpy's and `random`'s global RNGs, the ones transforms draw from."""
    # Only the CPU generator: torch.manual_seed would also reseed the trainer's CUDA RNGs.
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed & 0xFFFF_FFFF)  # numpy's legacy global RNG takes 32-bit seeds


def _rng_state() -> tuple:
    """The global RNG states `_seed_rngs` overwrites."""
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


def _set_rng_state(state: tuple) -> None:
    """Restore states taken by `_rng_state`."""
    torch.set_rng_state(state[0])
    random.setstate(state[1])
    np.random.set_state(state[2])


def _stack(vals: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack, except that (C, H, W) images with channels-last strides stay channels-last."""
    v = vals[0]
    if v.dim() == 3 and v.permute(1, 2, 0).is_contiguous():
        # Stacked as (H, W, C), a plain copy per image, and viewed as (B, C, H, W) with channels-last
        # strides. torch.stack would give a CHW batch, transposing every image: ~30x slower for uint8
        # (170 vs 6 us per 192 px image, ~7% of a whole sample).
        return torch.stack([x.permute(1, 2, 0) for x in vals]).permute(0, 3, 1, 2)
    return torch.stack(vals)


def _collate(samples: list[dict]) -> dict:
    out = {}
    for k in samples[0]:
        vals = [s[k] for s in samples]
        if isinstance(vals[0], torch.Tensor):
            out[k] = _stack(vals)
        elif isinstance(vals[0], int):
            out[k] = torch.tensor(vals, dtype=torch.long)
        else:
            out[k] = vals
    return out


def _as_is(chunk: dict) -> dict:
    """DataLoader collate_fn: chunks are collated already (its default would walk every key list)."""
    return chunk


class _EpochStream(IterableDataset):
    """One rank's epoch, read by DataLoader workers; yields chunks of decoded samples plus bookkeeping."""

    def __init__(self, urls: list[str], pieces: list[Piece], skip: dict[int, int],
                 replay: dict[int, tuple[int, int]], counted: dict[int, int], offset: int, transform: Callable,
                 chunk_size: int, seeds: tuple[int, int, int], shuffle_buffer: int, interleave: int,
                 max_pixels: int, num_classes: int | None):
        self.urls, self.pieces, self.replay, self.offset = urls, pieces, replay, offset
        self.skip = {p: max(skip.get(p, 0), pc.lo) for p, pc in enumerate(pieces)}  # an elastic piece starts at lo
        self.counted = counted  # per piece: errors at output positions below this were counted before a resume
        self.transform, self.chunk_size, self.seeds = transform, chunk_size, seeds
        self.shuffle_buffer, self.interleave, self.max_pixels = shuffle_buffer, interleave, max_pixels
        self.num_classes = num_classes

    def _piece_outputs(self, p: int, on_error: Callable[[str, str, int, int], None]
                       ) -> Iterator[tuple[int, str, dict]]:
        """(output position, key, raw sample) of piece p in its fixed shuffled order.

        A read error is reported at the position of the next output: the draw that returns it meets it.
        """
        shard, start, end, seeds, piece, _, hi = self.pieces[p]
        rng = random.Random(f"{seeds}-{piece}")
        buf, pos = [], 0
        raw = iter_tar_samples(open_shard(self.urls[shard]), lambda reason, detail: on_error(reason, detail, p, pos),
                               self.urls[shard])
        for i, (key, sample) in enumerate(raw):
            if i < start:
                continue
            if i >= end:
                break
            buf.append((key, sample))
            if len(buf) >= self.shuffle_buffer:
                j = rng.randrange(len(buf))
                buf[j], buf[-1] = buf[-1], buf[j]
                if pos >= hi:  # the rest of the piece belongs to another rank (elastic resume)
                    break
                yield pos, *buf.pop()
                pos += 1
        raw.close()  # releases the file/pipe now rather than at garbage collection
        if pos < hi:
            rng.shuffle(buf)
            for key, sample in buf[:hi - pos]:
                yield pos, key, sample
                pos += 1

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is not None:
            yield from self._chunks(info.id, info.num_workers)
            return
        # Main process (num_workers=0): the global RNGs belong to the training loop, so hand them
        # back at every yield. Per chunk, not per sample: numpy's get/set_state costs ~0.1 ms.
        chunks = self._chunks(0, 1)
        while True:
            saved = _rng_state()
            try:
                out = next(chunks, None)
            finally:
                _set_rng_state(saved)
            if out is None:
                return
            yield out

    def _chunks(self, phys: int, nw: int) -> Iterator[dict]:
        """Chunks read by physical worker `phys` of `nw`."""
        # Logical worker ids rotate so that after a resume DataLoader's worker 0 continues the
        # round-robin where the interrupted run stopped.
        wid = (phys + self.offset) % nw
        corrupt: Counter = Counter()
        # Per piece drawn from since the last chunk: outputs drawn so far, or one past its length once it
        # ran dry. The errors it met at positions below that are all in `corrupt`.
        drawn: dict[int, int] = {}
        warn = WarningLimiter(log)
        replay, phase = self.replay.get(wid, (0, 0))

        def on_error(reason: str, detail: str, p: int, pos: int) -> None:
            # Errors met while fast-forwarding, or below a piece's `counted`, were counted before the resume.
            if draw >= replay and pos >= self.counted.get(p, 0):
                corrupt[reason] += 1
                warn(reason, detail)

        todo = deque(p for p in range(wid, len(self.pieces), nw)
                     if self.skip[p] < self.pieces[p].hi)
        active: list[tuple[int, Iterator]] = []
        pick = random.Random(f"{self.seeds}-mix-{wid}-{nw}")
        chunk: list[dict] = []
        rows: list[list[int]] = []
        target = self.chunk_size - phase  # finish the chunk a resumed run was in the middle of
        draw = -1
        while todo or active:
            while todo and len(active) < self.interleave:
                p = todo.popleft()
                active.append((p, self._piece_outputs(p, on_error)))
            draw += 1
            a = pick.randrange(len(active))
            p, it = active[a]
            nxt = next(it, None)
            if nxt is None:
                drawn[p] = self.pieces[p].hi + 1
                active.pop(a)
                continue
            pos, key, sample = nxt
            drawn[p] = pos + 1
            if draw < replay or pos < self.skip[p]:
                continue
            img, label, reason = decode_sample(sample, self.max_pixels, self.num_classes)
            if img is None:
                on_error(reason, f"{self.urls[self.pieces[p][0]]} key {key}", p, pos)
                continue
            # Seeded per sample, not per worker: samples skipped on resume draw nothing, and a worker's
            # RNG stream would otherwise depend on which samples it happened to decode before.
            _seed_rngs(_sample_seed(self.pieces[p].seeds, self.pieces[p].piece, pos))
            out = self.transform(img)
            out = dict(out) if isinstance(out, dict) else {"image": out}
            out.update(label=label, __key__=key)
            chunk.append(out)
            rows.append([p, pos, wid, draw])
            if len(chunk) == target:
                yield self._emit(chunk, rows, corrupt, drawn)
                chunk, rows, target = [], [], self.chunk_size
        if chunk or corrupt:
            yield self._emit(chunk, rows, corrupt, drawn)

    @staticmethod
    def _emit(chunk: list[dict], rows: list[list[int]], corrupt: Counter, drawn: dict[int, int]) -> dict:
        out = _collate(chunk) if chunk else {}
        if chunk:
            # Columns: piece, output position in piece, logical worker, draw, index in chunk, chunk size.
            out["__pos__"] = torch.tensor([r + [i, len(rows)] for i, r in enumerate(rows)], dtype=torch.long)
        out["__corrupt__"] = (dict(corrupt), dict(drawn))  # skips per reason, and how far they are counted
        corrupt.clear()
        drawn.clear()
        return out


def _size(chunk: dict) -> int:
    return len(chunk["__key__"]) if "__key__" in chunk else 0


def _slice(chunk: dict, a: int, b: int) -> dict:
    return {k: v[a:b] for k, v in chunk.items() if k != "__corrupt__"}


def _concat(parts: list[dict]) -> dict:
    out = {}
    for k, v in parts[0].items():
        out[k] = torch.cat([p[k] for p in parts]) if isinstance(v, torch.Tensor) else \
            [x for p in parts for x in p[k]]
    return out


class ShardLoader:
    """Batches from WebDataset shards: `{"image", ["mask"], "label", "__key__"}`, equal count on every rank.

    Args:
        urls: folder (uses `split`), brace pattern, list file, `pipe:` command, or a list of those.
        transform: PIL image -> tensor, or -> dict of tensors (e.g. `SimMIMTransform`).
        batch_size: samples per batch on this rank.
        rank, world_size: this process's place among the data-parallel ranks.
        num_workers: DataLoader worker processes (0 = read in the main process).
        seed: seeds shard order, per-piece shuffles and per-sample augmentation RNGs.
        resampled: draw shards with replacement per rank (independent ranks, no once-per-epoch
            guarantee; every epoch is a fresh draw, so it never runs dry).
        split: which split of a folder's `index.json` to read.
        index: path of an `index.json` holding the sample counts, when it is not next to the shards.
        drop_last: if False, a last smaller batch holds the rank's remainder (same size on all ranks).
        shuffle_buffer: samples held per open piece for in-shard shuffling (memory: x sample bytes).
        interleave: pieces each worker reads at once, mixing samples across shards.
        prefetch_factor, pin_memory: passed to torch's DataLoader.
        max_pixels: decompression-bomb limit; larger images are skipped as `too_large`.
        num_classes: classes of the classifier being trained. Samples without a `.cls` member
            (`no_label`) or with a class id outside [0, num_classes) (`label_out_of_range`) are
            skipped and counted like corrupt ones, before their image is decoded. None (pretraining):
            no label is required (-1 marks a missing one); only class ids beyond int64 are skipped.
    """

    def __init__(self, urls, transform: Callable, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 num_workers: int = 4, seed: int = 0, resampled: bool = False, split: str = "train",
                 index: str | os.PathLike | None = None, drop_last: bool = True, shuffle_buffer: int = 256,
                 interleave: int = 4, prefetch_factor: int = 2, pin_memory: bool = False,
                 max_pixels: int = DEFAULT_MAX_PIXELS, num_classes: int | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be >= 1, or None when no labels are needed")
        self.urls = expand_urls(urls, split)
        if not self.urls:
            raise ValueError(f"no shards found for {urls!r}")
        self.counts = shard_counts(self.urls, index)
        self.transform, self.batch_size = transform, batch_size
        self.rank, self.world_size, self.num_workers, self.seed = rank, world_size, num_workers, seed
        self.resampled, self.drop_last = resampled, drop_last
        self.shuffle_buffer, self.interleave = max(1, shuffle_buffer), max(1, interleave)
        self.prefetch_factor, self.pin_memory, self.max_pixels = prefetch_factor, pin_memory, max_pixels
        self.num_classes = num_classes
        self.per_rank = sum(self.counts) // world_size
        n = self.per_rank // batch_size if drop_last else -(-self.per_rank // batch_size)
        if n == 0:
            raise ValueError(f"{sum(self.counts)} samples over {world_size} ranks give no batch of {batch_size}: "
                             f"lower batch_size to at most {max(1, self.per_rank)} or add shards")
        self._len = n
        self._fingerprint = hashlib.sha256(repr((self.urls, self.counts)).encode()).hexdigest()[:16]
        self._corrupt: Counter = Counter()
        self.padded = 0
        self._nw = max(1, num_workers)
        self._reset(0)

    def _reset(self, epoch: int) -> None:
        self.epoch, self._batches = epoch, 0
        self._consumed: dict[int, int] = {}  # piece -> outputs delivered (a prefix of its fixed order)
        self._counted: dict[int, int] = {}  # piece -> its errors at output positions below this are counted
        self._base: dict[int, int] = {}  # per-piece prefix skipped when the current stream started
        self._workers: dict[int, list[int]] = {}  # logical worker -> [draws done, samples of open chunk]
        self._next_worker = 0
        self._elastic: list[Piece] | None = None  # this epoch's re-cut plan after a change of world size

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return self._len

    @property
    def num_samples(self) -> int:
        """Samples listed in the shards (all ranks together, corrupt ones included)."""
        return sum(self.counts)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate; a no-op for the current one, so it keeps a restored position."""
        if epoch != self.epoch:
            self._reset(epoch)

    def corrupt_counts(self) -> dict[str, int]:
        """Skipped items on this rank since construction, per reason (see `data.shards.REASONS`)."""
        return dict(self._corrupt)

    def state_dict(self) -> dict:
        """Position within the epoch (batches delivered, per-piece and per-worker progress) and counters."""
        return {"epoch": self.epoch, "batches": self._batches, "consumed": dict(self._consumed),
                "base": dict(self._base), "counted": dict(self._counted),
                "workers": {w: list(v) for w, v in self._workers.items()}, "next_worker": self._next_worker,
                "num_workers": self._nw, "corrupt": dict(self._corrupt), "padded": self.padded, "seed": self.seed,
                "rank": self.rank, "world_size": self.world_size, "batch_size": self.batch_size,
                "resampled": self.resampled, "num_classes": self.num_classes, "shards": self._fingerprint,
                "elastic": [list(p) for p in self._elastic] if self._elastic is not None else None}

    def _check_saved_by_same_setup(self, state: dict, also: tuple[str, ...]) -> None:
        """ValueError unless `state` was saved by a loader of the same shards, seed and sampling (and `also`)."""
        # num_classes decides which samples are skipped; states saved before it existed had none.
        for k in ("seed", "resampled", "num_classes", *also):
            if state.get(k) != getattr(self, k):
                raise ValueError(f"loader state has {k}={state.get(k)} but this loader has {getattr(self, k)}: "
                                 f"construct the loader with {k}={state.get(k)} to resume")
        if state["shards"] != self._fingerprint:
            raise ValueError("loader state was saved for a different shard list or sample counts: "
                             "resume with the same shards (and index.json)")

    def load_state_dict(self, state: dict) -> None:
        """Restore a position saved by `state_dict` on the same rank; num_workers may differ.

        With the same num_workers the rest of the epoch comes in exactly the uninterrupted order;
        with another count it holds exactly the same samples in another order.
        """
        self._check_saved_by_same_setup(state, ("rank", "world_size", "batch_size"))
        self._reset(state["epoch"])
        self._batches = state["batches"]
        self._consumed = {int(k): int(v) for k, v in state["consumed"].items()}
        # States saved before "counted" existed: the delivered prefixes are the ones surely counted.
        self._counted = {int(k): int(v) for k, v in state.get("counted", state["consumed"]).items()}
        if state["num_workers"] == self._nw:
            self._base = {int(k): int(v) for k, v in state["base"].items()}
            self._workers = {int(k): list(v) for k, v in state["workers"].items()}
            self._next_worker = state["next_worker"]
        else:
            # Worker streams cannot be replayed under another worker count: restart them from the
            # per-piece prefixes instead (same samples, new interleaving).
            self._base = dict(self._consumed)
        self._corrupt = Counter(state["corrupt"])
        self.padded = state["padded"]
        if state.get("elastic") is not None:
            self._elastic = elastic.from_lists(state["elastic"])

    def load_elastic_states(self, states: list[dict]) -> int:
        """Continue the epoch that the loaders of another number of ranks saved `states` in (all of them).

        This rank reads an equal contiguous share of what those ranks had not delivered (see
        `data.elastic`), then normal epochs on this world size. Returns the samples dropped to make the
        shares equal (fewer than world_size). Transforms keep their per-sample seeds; the order differs.
        """
        first = states[0]
        self._check_saved_by_same_setup(first, ())
        if sorted(s["rank"] for s in states) != list(range(first["world_size"])) or \
                {(s["epoch"], s["batches"]) for s in states} != {(first["epoch"], first["batches"])}:
            raise ValueError("elastic resume needs the loader states of every rank, all at the same batch")
        states = sorted(states, key=lambda s: s["rank"])
        self._reset(first["epoch"])
        plans = [self._plan_of(s) for s in states]
        old_batches = self._batches_of(sum(p.hi - p.lo for p in plans[0]), first["batch_size"])
        self._corrupt = Counter() if self.rank else sum((Counter(s["corrupt"]) for s in states), Counter())
        self.padded = 0 if self.rank else sum(s["padded"] for s in states)  # totals kept once, on rank 0
        if first["batches"] >= old_batches:  # the epoch was over: start the next one here
            self._reset(first["epoch"] + 1)
            return 0
        rest = [r for s, plan in zip(states, plans)
                for r in elastic.remainders(plan, {int(k): v for k, v in s["consumed"].items()},
                                            {int(k): v for k, v in s.get("counted", s["consumed"]).items()})]
        self._elastic, self._counted = elastic.split(rest, self.rank, self.world_size)
        return sum(p.hi - p.lo for p, _ in rest) % self.world_size

    def _plan_of(self, state: dict) -> list[Piece]:
        """The pieces the rank that saved `state` read in its epoch."""
        if state.get("elastic") is not None:
            return elastic.from_lists(state["elastic"])
        plan = plan_epoch(self.counts, state["epoch"], self.seed, state["rank"], state["world_size"], self.resampled)
        return elastic.as_pieces(plan, (self.seed, state["epoch"], state["rank"]))

    def _pieces(self) -> list[Piece]:
        """This rank's pieces of the current epoch."""
        if self._elastic is not None:
            return self._elastic
        plan = plan_epoch(self.counts, self.epoch, self.seed, self.rank, self.world_size, self.resampled)
        return elastic.as_pieces(plan, (self.seed, self.epoch, self.rank))

    def _batches_of(self, samples: int, batch_size: int) -> int:
        return samples // batch_size if self.drop_last else -(-samples // batch_size)

    def _batch_sizes(self) -> list[int]:
        samples = sum(p.hi - p.lo for p in self._elastic) if self._elastic is not None else self.per_rank
        n = self._batches_of(samples, self.batch_size)
        sizes = [self.batch_size] * n
        if sizes and not self.drop_last:
            sizes[-1] = samples - (n - 1) * self.batch_size
        return sizes

    def _stream(self, pieces: list, skip: dict, replay: dict, counted: dict, offset: int) -> _EpochStream:
        return _EpochStream(self.urls, pieces, skip, replay, counted, offset, self.transform, self.batch_size,
                            (self.seed, self.epoch, self.rank), self.shuffle_buffer, self.interleave,
                            self.max_pixels, self.num_classes)

    def _record(self, rows: torch.Tensor) -> None:
        """Mark a delivered batch's samples (rows of `__pos__`) as consumed."""
        for p, pos, w, draw, i, n in rows.tolist():
            self._consumed[p] = max(self._consumed.get(p, 0), pos + 1)
            self._workers[w] = [draw + 1, (i + 1) % n]
            self._next_worker = w if i + 1 < n else (w + 1) % self._nw

    def __iter__(self) -> Iterator[dict]:
        """Yield the rest of the current epoch's batches, then advance to the next epoch."""
        epoch, sizes = self.epoch, self._batch_sizes()
        if self._batches < len(sizes):
            pieces = self._pieces()
            if self._batches == 0 and len(pieces) < self._nw:
                log.warning("rank %d has %d shard pieces for %d workers: some workers idle; use at least "
                            "world_size x num_workers shards", self.rank, len(pieces), self._nw)
            stream = self._stream(pieces, dict(self._base), {w: tuple(v) for w, v in self._workers.items()},
                                  dict(self._counted), self._next_worker)
            # A private generator: DataLoader draws its worker base seed from it on every iter(), which
            # would otherwise advance the trainer's torch RNG at different steps in a resumed run. The
            # base seed itself matters to nothing: transforms are reseeded per sample.
            dl = DataLoader(stream, batch_size=None, num_workers=self.num_workers, pin_memory=False,
                            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
                            generator=torch.Generator(), collate_fn=_as_is)
            pending: deque = deque()
            have, last = 0, None
            it = iter(dl)
            while self._batches < len(sizes):
                want = sizes[self._batches]
                while have < want:
                    chunk = next(it, None)
                    if chunk is None:
                        break
                    counts, counted = chunk.pop("__corrupt__")
                    self._corrupt.update(counts)
                    for p, n in counted.items():
                        self._counted[p] = max(self._counted.get(p, 0), n)
                    if _size(chunk):
                        pending.append(chunk)
                        have += _size(chunk)
                if have >= want:
                    batch, have = self._take(pending, want), have - want
                    self._record(batch["__pos__"])
                else:
                    if last is None and not have:
                        # Resumed inside the padded tail: nothing left to read, so repeat the
                        # epoch's first samples.
                        last = next(iter(self._stream(pieces, {}, {}, {}, 0)), None)
                        if last is None or not _size(last):
                            raise RuntimeError(f"rank {self.rank} decoded no sample in epoch {epoch} "
                                               f"(skipped: {dict(self._corrupt)}); check the shards with "
                                               "`python -m data.check_shards`")
                    batch = self._pad(pending, have, last, want)
                    have = 0
                last = batch
                self._batches += 1
                out = {k: v for k, v in batch.items() if k not in _META}
                if self.pin_memory:
                    out = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in out.items()}
                yield out
            del it, dl  # shuts the workers down before the next epoch starts new ones
        if self.epoch == epoch:
            self._reset(epoch + 1)

    def forever(self) -> Iterator[dict]:
        """Iterate epoch after epoch without end (for step-based training loops)."""
        while True:
            yield from self

    @staticmethod
    def _take(pending: deque, n: int) -> dict:
        # Fast path: a worker chunk that is exactly one batch is passed through without a copy.
        if _size(pending[0]) == n:
            return pending.popleft()
        parts, need = [], n
        while need:
            c = pending[0]
            k = _size(c)
            if k <= need:
                parts.append(pending.popleft())
                need -= k
            else:
                parts.append(_slice(c, 0, need))
                pending[0] = _slice(c, need, k)
                need = 0
        return _concat(parts)

    def _pad(self, pending: deque, have: int, last: dict | None, want: int) -> dict:
        """Fill a batch the rank's valid samples cannot fill, repeating samples seen this epoch."""
        parts = [self._take(pending, have)] if have else []
        for p in parts:
            self._record(p["__pos__"])
        source = _concat(parts + ([{k: v for k, v in last.items() if k != "__corrupt__"}] if last else []))
        idx = torch.arange(want - have) % _size(source)
        fill = {k: v[idx] if isinstance(v, torch.Tensor) else [v[i] for i in idx.tolist()]
                for k, v in source.items()}
        self.padded += want - have
        log.warning("rank %d: %d samples repeated to keep %d batches per epoch (skipped so far: %s)",
                    self.rank, want - have, self._len, dict(self._corrupt))
        return _concat(parts + [fill])
