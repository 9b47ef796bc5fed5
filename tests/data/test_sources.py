import pytest
from omegaconf import OmegaConf

from jointdit.data.sources import FolderSource, SyntheticSource, build_source, caption_from_label
from jointdit.data.synthetic import SyntheticSpec


def _avsync_layout(root):
    for relative in ["hammering/a.mp4", "hammering/b.mp4", "dog_barking/c.mp4", "lions_roaring/d.mp4"]:
        (root / "videos" / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / "videos" / relative).write_bytes(b"x")
    (root / "train.txt").write_text("hammering/a.mp4\ndog_barking/c.mp4\n\nlions_roaring/d.mp4\n")
    (root / "test.txt").write_text("hammering/b.mp4\n")
    return root


def test_folder_source_reads_avsync15_layout_and_captions_from_class_names(tmp_path):
    source = FolderSource(_avsync_layout(tmp_path))
    train, val = source.clips("train"), source.clips("val")
    assert [c.path.relative_to(tmp_path / "videos").as_posix() for c in train] == [
        "hammering/a.mp4", "dog_barking/c.mp4", "lions_roaring/d.mp4"]
    assert [c.caption for c in train] == ["hammering", "dog barking", "lions roaring"]
    assert [c.label for c in val] == ["hammering"] and val[0].split == "val"
    assert len({c.id for c in train + val}) == 4 and all(c.events is None for c in train)
    assert caption_from_label("playing_cello_") == "playing cello"


def test_missing_list_file_says_what_to_do(tmp_path):
    _avsync_layout(tmp_path)
    (tmp_path / "test.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"test.txt is missing: it should hold one '<class>/<file>.mp4'"):
        FolderSource(tmp_path).clips("val")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FolderSource(tmp_path / "nowhere").clips("train")


def test_without_lists_every_clip_is_split_by_a_stable_hash(tmp_path):
    source = FolderSource(_avsync_layout(tmp_path), lists=None, val_fraction=0.5)
    train, val = source.clips("train"), source.clips("val")
    assert len(train) + len(val) == 4 and {c.id for c in train}.isdisjoint({c.id for c in val})
    assert [c.id for c in source.clips("val")] == [c.id for c in val]


def test_synthetic_source_writes_on_first_use_and_carries_events(tmp_path):
    spec = SyntheticSpec(size=32, fps=8, seconds=1.0)
    source = SyntheticSource(root=tmp_path / "syn", num_clips=8, seed=3, spec=spec, val_fraction=0.25)
    train, val = source.clips("train"), source.clips("val")
    assert len(train) == 6 and len(val) == 2
    assert all(c.path.exists() and c.events is not None for c in train + val)
    assert train[0].caption == "a red ball bouncing on the floor"
    stamp = (tmp_path / "syn" / "metadata.jsonl").stat().st_mtime_ns
    source.clips("train")  # complete: not written again
    assert (tmp_path / "syn" / "metadata.jsonl").stat().st_mtime_ns == stamp


def test_build_source_from_config(tmp_path):
    folder = build_source(OmegaConf.create({"name": "avsync15", "root": str(tmp_path), "videos_dir": "videos",
                                            "lists": {"train": "train.txt", "val": "test.txt"}}))
    assert isinstance(folder, FolderSource) and folder.root == tmp_path
    with pytest.raises(ValueError, match="unknown data source 'kinetics'"):
        build_source(OmegaConf.create({"name": "kinetics"}))
