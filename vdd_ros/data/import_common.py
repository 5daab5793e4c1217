"""What every importer (``vdd import-bag``, ``import-hdf5``, ``import-lerobot``) shares.

- the report: one ``EpisodeReport`` per episode (kept or dropped) with statistics per stream
  (a bag's topic, an HDF5 obs key, a LeRobot column), gathered in an ``ImportReport`` that prints
  the per-episode table and writes the JSON report;
- ``Episodes``: drops episodes shorter than ``min_steps`` and builds the DemoDataset of the rest;
- for file formats whose observation arrays are named by the file, not by the spec: the mapping
  from source keys to the spec's observation fields (``--key`` or robot.yaml's ``hdf5_keys`` /
  ``lerobot_keys``), the check that each source has the width of its fields, and the frame built
  from the sources in the spec's field order;
- ``SourceError``: ``<kind> <file>: <key>: expected <what>, got <actual>``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vdd_ros.data.dataset import DemoDataset
from vdd_ros.data.robot import _key_mapping
from vdd_ros.spec import ModelSpec
from vdd_ros.validation import FieldError

DEFAULT_MIN_STEPS = 10
NS = 1_000_000_000


class SourceError(FieldError):
    """A demonstration file cannot be imported: ``<where>: <key>: expected <expected>, got <actual>``."""

    def __init__(self, field_name: str, expected: str, actual: Any, where: str):
        super().__init__(field_name, expected, actual)
        self.where = where
        self.args = (f"{where}: {self.args[0]}",)


# --- the report -------------------------------------------------------------------------------
@dataclass
class EpisodeReport:
    source: str  # the bag, HDF5 file or parquet file the episode came from
    index: int  # within its source (a bag's episode, demo_N's N, a LeRobot episode_index)
    start_s: float  # seconds after the source's first message or frame
    steps: int
    duration_s: float
    streams: dict = field(default_factory=dict)  # topic / obs key / column -> statistics (``stream_stats``)
    dropped_reason: str = ""

    @property
    def topics(self) -> dict:
        """The streams of a bag episode, by topic."""
        return self.streams

    def to_dict(self, source_label: str = "bag", stream_label: str = "topic") -> dict:
        data = {source_label: self.source, "episode": self.index, "start_s": round(self.start_s, 3),
                "steps": self.steps, "duration_s": round(self.duration_s, 3), f"{stream_label}s": self.streams}
        if self.dropped_reason:
            data["dropped"] = self.dropped_reason
        return data


@dataclass
class ImportReport:
    episodes: list  # EpisodeReport, kept and dropped
    notes: list  # one line each (stamp fallbacks, assumptions, ...)
    seconds: float = 0.0
    source_label: str = "bag"  # what an episode's source is called in the table and the JSON
    stream_label: str = "topic"  # what a stream is called

    @property
    def kept(self) -> list:
        return [e for e in self.episodes if not e.dropped_reason]

    def summary(self) -> dict:
        kept = self.kept
        return {"episodes": len(kept), "dropped_episodes": len(self.episodes) - len(kept),
                "steps": sum(e.steps for e in kept), "duration_s": round(sum(e.duration_s for e in kept), 3),
                "import_seconds": round(self.seconds, 3)}

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "notes": list(self.notes),
                "episodes": [e.to_dict(self.source_label, self.stream_label) for e in self.episodes]}

    def format(self) -> str:
        """The per-episode table and the summary line."""
        header = (self.source_label, "ep", "start s", "steps", "dur s", self.stream_label, "msgs", "Hz", "dropped",
                  "dup", "jitter ms", "max gap ms", "note")
        rows = [header]
        short = _short_names([ep.source for ep in self.episodes])
        for ep in self.episodes:
            for i, (stream, stats) in enumerate(ep.streams.items()):
                first = (short[ep.source], str(ep.index), f"{ep.start_s:.2f}", str(ep.steps),
                         f"{ep.duration_s:.2f}") if i == 0 else ("",) * 5
                rows.append((*first, stream, str(stats["messages"]), f"{stats['rate_hz']:.1f}", str(stats["dropped"]),
                             str(stats["duplicated"]), f"{stats['jitter_ms']:.2f}", f"{stats['largest_gap_ms']:.1f}",
                             (f"DROPPED: {ep.dropped_reason}" if ep.dropped_reason else "") if i == 0 else ""))
        widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        lines += [f"note: {note}" for note in self.notes]
        s = self.summary()
        lines.append(f"kept {s['episodes']} episodes ({s['steps']} steps, {s['duration_s']:.1f} s), dropped "
                     f"{s['dropped_episodes']}, read in {s['import_seconds']:.1f} s")
        return "\n".join(lines)


def _short_names(sources: list) -> dict:
    """Each source's file name, with as many parent folders as it takes to tell different sources apart."""
    sources = sorted(set(sources))
    parts = {source: source.rstrip("/").split("/") for source in sources}
    for depth in range(1, max((len(p) for p in parts.values()), default=1) + 1):
        names = {source: "/".join(p[-depth:]) for source, p in parts.items()}
        if len(set(names.values())) == len(names):
            return names
    return {source: source for source in sources}


def stream_stats(stamps: np.ndarray, start: int | None = None, end: int | None = None) -> dict:
    """Messages, rate, dropped (missing from the stream's own median rate) and duplicated (same stamp)
    messages, stamp jitter and the largest gap of the stamps (ns) inside ``[start, end)`` (default: all)."""
    stamps = np.asarray(stamps, dtype=np.int64)
    inside = stamps
    if start is not None:
        inside = inside[inside >= start]
    if end is not None:
        inside = inside[inside < end]
    stats = {"messages": int(inside.size), "rate_hz": 0.0, "dropped": 0, "duplicated": 0, "jitter_ms": 0.0,
             "largest_gap_ms": 0.0}
    if inside.size < 2:
        return stats
    intervals = np.diff(inside).astype(np.float64)
    duplicated = int(np.sum(intervals == 0))
    positive = intervals[intervals > 0]
    if positive.size == 0:
        return dict(stats, duplicated=duplicated)
    period = float(np.median(positive))
    long = positive[positive > 1.5 * period]
    stats.update(rate_hz=round((inside.size - 1) * NS / float(inside[-1] - inside[0]), 3), duplicated=duplicated,
                 dropped=int(np.sum(np.round(long / period) - 1)),
                 jitter_ms=round(float(np.std(positive[positive <= 1.5 * period] - period)) / 1e6, 3),
                 largest_gap_ms=round(float(positive.max()) / 1e6, 3))
    return stats


# --- episodes -> dataset ------------------------------------------------------------------------
class Episodes:
    """Collects episodes in reading order: those shorter than ``min_steps`` are reported and dropped."""

    def __init__(self, spec: ModelSpec, min_steps: int = DEFAULT_MIN_STEPS):
        self.spec = spec
        self.min_steps = min_steps
        self.started = time.perf_counter()
        self.reports: list[EpisodeReport] = []
        self.observations: list[np.ndarray] = []
        self.actions: list[np.ndarray] = []

    def add(self, report: EpisodeReport, obs: np.ndarray | None, act: np.ndarray | None) -> None:
        if report.steps < self.min_steps:
            report.dropped_reason = f"{report.steps} steps < min_steps {self.min_steps}"
        else:
            self.observations.append(obs)
            self.actions.append(act)
        self.reports.append(report)

    def finish(self, notes: list, no_episode, source_label: str = "bag",
               stream_label: str = "topic") -> tuple[DemoDataset, ImportReport]:
        """The dataset of the kept episodes and the report; ``no_episode(expected, actual)`` raises when none
        is kept."""
        report = ImportReport(episodes=self.reports, notes=list(notes), seconds=time.perf_counter() - self.started,
                              source_label=source_label, stream_label=stream_label)
        if not self.observations:
            no_episode(f"at least one episode of >= {self.min_steps} steps ({len(self.reports)} shorter ones "
                       "dropped)", 0)
        ends = np.cumsum([len(obs) for obs in self.observations])
        dataset = DemoDataset(observations=np.concatenate(self.observations), actions=np.concatenate(self.actions),
                              episode_ends=ends, spec=self.spec, task=self.spec.task)
        return dataset, report


# --- source keys -> observation fields -----------------------------------------------------------
@dataclass(frozen=True)
class FieldSources:
    """Which source (HDF5 obs key, LeRobot column) fills which observation fields, in the spec's order."""

    sources: dict  # source key -> tuple of field names (its columns, split in this order)
    sizes: dict  # field name -> size

    def width(self, source: str) -> int:
        return sum(self.sizes[name] for name in self.sources[source])

    def describe(self, source: str) -> str:
        return " + ".join(f"{name}[{self.sizes[name]}]" for name in self.sources[source])

    def frame(self, spec: ModelSpec, arrays: dict) -> np.ndarray:
        """Observation frames ``[T, obs_step_dim]`` from ``{source: [T, width]}`` (widths already checked)."""
        columns = {}
        for source, names in self.sources.items():
            at = 0
            for name in names:
                columns[name] = arrays[source][:, at:at + self.sizes[name]]
                at += self.sizes[name]
        return np.concatenate([columns[f.name] for f in spec.observation_fields], axis=1).astype(np.float64)


def field_sources(spec: ModelSpec, given: dict | None, configured: dict, section: str, available,
                  fail) -> FieldSources:
    """Resolve the mapping: ``given`` (``--key``, ``{source: field or [fields]}``) replaces ``configured``
    (robot.yaml's ``section``); a field left unmapped is read from a source named like it when ``available``
    has one. ``fail(key, expected, actual)`` raises for a bad ``--key`` and for a field no source fills.
    """
    names = [f.name for f in spec.observation_fields]
    if given:
        mapping = _key_mapping(given, "--key", names, fail)
    else:
        mapping = dict(configured)
    mapped = {name for fields_ in mapping.values() for name in fields_}
    available = list(available)
    for name in names:
        if name not in mapped:
            if name in available and name not in mapping:
                mapping[name] = (name,)
                continue
            fail(name, f"a source mapped to this observation field (--key SOURCE={name} or {section} in "
                 f"robot.yaml; sources present: {available})", None)
    return FieldSources(sources=mapping, sizes={f.name: f.size for f in spec.observation_fields})


def first_non_finite(values: np.ndarray) -> int | None:
    """Row index of the first row holding a NaN or infinity, None when all are finite."""
    bad = np.flatnonzero(~np.isfinite(values).all(axis=tuple(range(1, values.ndim))))
    return int(bad[0]) if bad.size else None
