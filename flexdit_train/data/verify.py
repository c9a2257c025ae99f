"""Shard-set checks: sample counts, truncated tars, duplicate keys across shards, split (non-contiguous) keys.

Reads tar headers only (with seeks), so it is fast on large sets: a member whose data runs past the end
of the file, or a missing end-of-archive block, means a truncated shard.
"""

from __future__ import annotations

import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field

import webdataset as wds

from flexdit_train.data.index import resolve_shards

END_BLOCKS = 2 * tarfile.BLOCKSIZE  # a tar ends with two zero blocks


@dataclass
class ShardReport:
    """What one shard holds and what is wrong with it."""

    url: str
    samples: int = 0
    problems: list[str] = field(default_factory=list)


def _member_end(member: tarfile.TarInfo) -> int:
    return member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def check_shard(url: str) -> tuple[ShardReport, list[str]]:
    """Report on one shard and the keys of its samples in order."""
    report, keys, end = ShardReport(url), [], 0
    size = os.path.getsize(url)
    try:
        with tarfile.open(url, "r:") as tar:
            current, members = None, set()
            for member in tar:
                end = _member_end(member)
                if end > size:
                    report.problems.append(f"truncated: {member.name} needs {end} bytes, the file has {size}")
                    break
                if not member.isreg():
                    continue
                key, ext = wds.tariterators.base_plus_ext(member.name)
                if key is None:
                    continue
                if key != current:
                    keys.append(key)
                    current, members = key, set()
                if ext in members:
                    report.problems.append(f"duplicate member {member.name}")
                members.add(ext)
    except (tarfile.TarError, OSError) as err:
        report.problems.append(f"unreadable: {type(err).__name__}: {err}")
    if not report.problems:
        with open(url, "rb") as fh:
            fh.seek(end)
            tail = fh.read()
        if len(tail) < END_BLOCKS or any(tail[:END_BLOCKS]):
            report.problems.append("truncated: no end-of-archive blocks after the last member")
    report.samples = len(keys)
    return report, keys


@dataclass
class VerifyReport:
    """Per-shard reports plus set-level problems (duplicate keys, count mismatches with the index)."""

    shards: list[ShardReport]
    problems: list[str]

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def damaged(self) -> list[ShardReport]:
        return [s for s in self.shards if s.problems]

    @property
    def ok(self) -> bool:
        return not self.problems and not self.damaged

    def summary(self) -> str:
        lines = [f"{s.url}: {p}" for s in self.damaged for p in s.problems] + self.problems
        verdict = "OK" if self.ok else f"DAMAGED ({len(self.damaged)} shards, {len(self.problems)} set problems)"
        return "\n".join([*lines, f"{len(self.shards)} shards, {self.samples} samples: {verdict}"])


def verify_shards(spec: str | list) -> VerifyReport:
    """Check every shard of a set; see the module docstring."""
    shard_set = resolve_shards(spec)
    reports, owner, problems = [], {}, []
    for url in shard_set.urls:
        report, keys = check_shard(url)
        runs = Counter(keys)
        split = [k for k, n in runs.items() if n > 1]
        if split:
            report.problems.append(f"{len(split)} split keys (members not contiguous), e.g. {split[0]}")
        for key in runs:
            if key in owner:
                problems.append(f"duplicate key {key} in {owner[key]} and {url}")
            else:
                owner[key] = url
        expected = (shard_set.counts or {}).get(url)
        if expected is not None and expected != report.samples:
            report.problems.append(f"index says {expected} samples, found {report.samples}")
        reports.append(report)
    if len(problems) > 10:
        problems = [*problems[:10], f"... and {len(problems) - 10} more duplicate keys"]
    return VerifyReport(reports, problems)
