"""Where clips come from: a folder of MP4s in AVSync15's layout, or the embedded synthetic set.

AVSync15's layout: ``<root>/videos/<class>/<file>.mp4`` plus list files (``train.txt``,
``test.txt``) whose lines are ``<class>/<file>.mp4``. Captions are the class names with
underscores turned into spaces, unless a ``metadata.jsonl`` beside the lists gives them.

Every entry must stay inside ``data.root``: a list line or ``metadata.jsonl`` path that is absolute,
climbs out with ``..``, or is a symlink to a file outside the root is refused with a
:class:`~jointdit.errors.DataError` naming the file and line.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from jointdit.data import synthetic
from jointdit.errors import DataError


@dataclass(frozen=True)
class ClipRef:
    id: str
    path: Path
    label: str
    caption: str
    split: str
    events: tuple[float, ...] | None = None  # seconds, where known


def caption_from_label(label: str) -> str:
    return label.replace("_", " ").strip()


@dataclass
class FolderSource:
    """Clips of ``root`` listed per split; ``lists`` maps our split names to list files.

    With ``lists=None`` every ``videos/<class>/*.mp4`` is used and split by a stable hash of its
    path (``val_fraction`` of them go to ``val``).
    """

    root: Path
    videos_dir: str = "videos"
    lists: dict[str, str] | None = field(default_factory=lambda: {"train": "train.txt", "val": "test.txt"})
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        self.root = Path(self.root).expanduser()

    @property
    def videos(self) -> Path:
        return self.root / self.videos_dir

    def _metadata(self) -> dict[str, dict]:
        index = self.root / "metadata.jsonl"
        if not index.exists():
            return {}
        rows = {}
        for number, line in enumerate(index.read_text().splitlines(), 1):
            if line.strip():
                row = json.loads(line)
                self.check_inside(row["path"], index, number)
                rows[row["path"]] = row
        return rows

    def check_inside(self, relative: str, listed_in: Path, line: int | None = None) -> Path:
        """``videos/<relative>`` — refused when ``relative`` is absolute, climbs out with ``..``, or
        resolves (through symlinks) to a file outside ``data.root``."""
        where = f"{listed_in}" + (f" line {line}" if line is not None else "")
        hint = (f"list entries are '<class>/<file>.mp4' relative to {self.videos}; move the clip under data.root "
                f"(a copy, not a symlink) or remove the line")
        if Path(relative).is_absolute() or ".." in Path(relative).parts:
            raise DataError(f"{where}: entry {relative!r} points outside data.root ({self.root})", hint=hint)
        path = self.videos / relative
        # The boundary is the resolved root or videos folder (a symlinked videos/ on another disk is fine).
        resolved, bounds = path.resolve(), (self.root.resolve(), self.videos.resolve())
        if not any(resolved.is_relative_to(bound) for bound in bounds):
            raise DataError(f"{where}: entry {relative!r} is a link to {resolved}, outside data.root ({self.root})",
                            hint=hint)
        return path

    def _listed(self, split: str) -> list[str]:
        if not self.root.is_dir():
            raise FileNotFoundError(f"data folder {self.root} does not exist; set data.root to a folder "
                                    f"with {self.videos_dir}/<class>/<file>.mp4 and list files")
        if self.lists is None:
            every = sorted(p.relative_to(self.videos).as_posix() for p in self.videos.glob("*/*.mp4"))
            for rel in every:
                self.check_inside(rel, self.videos)
            def is_val(rel: str) -> bool:
                return int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 10_000 < self.val_fraction * 10_000
            return [rel for rel in every if is_val(rel) == (split == "val")]
        if split not in self.lists:
            raise KeyError(f"unknown split {split!r}; this source has {sorted(self.lists)}")
        list_file = self.root / self.lists[split]
        if not list_file.exists():
            raise FileNotFoundError(
                f"list file {list_file} is missing: it should hold one '<class>/<file>.mp4' per line "
                f"(AVSync15 layout), or set data.lists=null to use every clip under {self.videos}")
        entries = []
        for number, line in enumerate(list_file.read_text().splitlines(), 1):
            if line.strip() and not line.startswith("#"):
                self.check_inside(line.strip(), list_file, number)
                entries.append(line.strip())
        return entries

    def clips(self, split: str) -> list[ClipRef]:
        metadata = self._metadata()
        refs = []
        for relative in self._listed(split):
            label = Path(relative).parent.name or "unlabelled"
            row = metadata.get(relative, {})
            events = row.get("events")
            refs.append(ClipRef(
                id=row.get("id") or Path(relative).with_suffix("").as_posix().replace("/", "__"),
                path=self.videos / relative,
                label=label,
                caption=row.get("caption") or caption_from_label(label),
                split=split,
                events=tuple(events) if events is not None else None,
            ))
        return refs


@dataclass
class SyntheticSource(FolderSource):
    """The embedded set, written to ``root`` on first use (and rewritten if its settings change)."""

    num_clips: int = 64
    seed: int = 0
    spec: synthetic.SyntheticSpec = field(default_factory=synthetic.SyntheticSpec)

    def prepare(self, progress: bool = True) -> "SyntheticSource":
        if not synthetic.dataset_is_complete(self.root, self.num_clips, self.seed, self.spec):
            synthetic.write_dataset(self.root, self.num_clips, self.seed, self.spec, self.val_fraction, progress)
        return self

    def clips(self, split: str) -> list[ClipRef]:
        self.prepare()
        return super().clips(split)


def build_source(data: DictConfig) -> FolderSource:
    """The clip source named by the ``data`` config group."""
    if data.name == "synthetic":
        spec = synthetic.SyntheticSpec(size=int(data.size), fps=float(data.fps), seconds=float(data.seconds),
                                       sample_rate=int(data.sample_rate))
        return SyntheticSource(root=Path(data.root), val_fraction=float(data.val_fraction),
                               num_clips=int(data.num_clips), seed=int(data.seed), spec=spec)
    if data.name in ("folder", "avsync15"):
        lists = None if data.get("lists") is None else dict(data.lists)
        return FolderSource(root=Path(data.root), videos_dir=data.get("videos_dir", "videos"), lists=lists,
                            val_fraction=float(data.get("val_fraction", 0.1)))
    raise ValueError(f"unknown data source {data.name!r}; choose synthetic, folder or avsync15")
