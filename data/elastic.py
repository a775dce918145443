"""Elastic resume of a `ShardLoader` epoch: the rest of an epoch stopped on N ranks, re-cut for M ranks.

A loader state records, per piece of its rank's plan, how many outputs went into delivered batches,
and that count is a prefix of the piece's fixed shuffled order. The rest of the epoch is therefore
the pieces' remainders. Laid end to end in (old rank, piece) order, the remainders are cut into M
equal contiguous ranges of output positions (a remainder may be split between two new ranks); the
R % M samples beyond M equal ranges are dropped. Every remainder keeps its old stream seeds and piece
id, so it is read through the same seeded shuffle and each sample keeps its augmentation seed; a new
rank only skips the positions outside its range. The re-cut plan is saved in the loader state, so it
resumes again (on the same or yet another number of ranks) the same way.
"""
from typing import NamedTuple


class Piece(NamedTuple):
    """A contiguous slice of one shard, read through the seeded shuffle of the rank that planned it."""
    shard: int
    first: int  # samples [first, end) of the shard
    end: int
    seeds: tuple[int, int, int]  # (seed, epoch, rank) of the planning rank: its shuffle and augmentation seeds
    piece: int  # index in that rank's plan, part of the same seeds
    lo: int  # output positions [lo, hi) of the piece's shuffled order that this rank reads
    hi: int


def as_pieces(plan: list[tuple[int, int, int]], seeds: tuple[int, int, int]) -> list[Piece]:
    """A normal epoch plan (`plan_epoch`) as whole pieces."""
    return [Piece(s, a, b, seeds, i, 0, b - a) for i, (s, a, b) in enumerate(plan)]


def from_lists(rows: list[list]) -> list[Piece]:
    """Pieces back from a saved state (tuples became lists)."""
    return [Piece(s, a, b, tuple(seeds), i, lo, hi) for s, a, b, seeds, i, lo, hi in rows]


def remainders(pieces: list[Piece], consumed: dict[int, int], counted: dict[int, int]
               ) -> list[tuple[Piece, int]]:
    """The undelivered rest of each piece, with the output position below which its errors were counted."""
    out = []
    for i, p in enumerate(pieces):
        lo = max(p.lo, consumed.get(i, 0))
        if lo < p.hi:
            out.append((p._replace(lo=lo), counted.get(i, 0)))
    return out


def split(rest: list[tuple[Piece, int]], rank: int, world_size: int) -> tuple[list[Piece], dict[int, int]]:
    """Rank `rank`'s equal contiguous share of the remainders: its pieces and their counted-error marks."""
    per = sum(p.hi - p.lo for p, _ in rest) // world_size
    a, b = rank * per, (rank + 1) * per
    pieces, counted, pos = [], {}, 0
    for p, done in rest:
        n = p.hi - p.lo
        x, y = max(a, pos), min(b, pos + n)
        if x < y:
            mine = p._replace(lo=p.lo + x - pos, hi=p.lo + y - pos)
            # Errors below `lo` are the previous owner's to count, even if the old rank never got there.
            counted[len(pieces)] = max(done, mine.lo)
            pieces.append(mine)
        pos += n
        if pos >= b:
            break
    return pieces, counted
