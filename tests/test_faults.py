"""Reliability (issue 15): every fault gets a clear error before work starts, nothing is lost or overwritten.

Each test names the issue's point it covers. The oracles are written from the issue's wording (the
message must name the key/file/step and say how to fix it; what existed before must be intact), not
from the implementation.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import PYTHON, REPO, run_module
from jointdit.errors import (CheckpointError, ConfigError, DataError, InitFromError, JointditError, LockError,
                             NonFiniteError, WriteError, run_cli)


# ----------------------------------------------------------------------------------------------
# 14. Error style: one line plus a hint, exit 2 for bad input, no traceback unless HYDRA_FULL_ERROR=1
# ----------------------------------------------------------------------------------------------


def test_a_bad_value_prints_one_error_with_a_hint_and_exit_code_2_without_traceback(tmp_path):
    result = run_module("jointdit.train", "max_steps=abc", "logger=none", f"hydra.run.dir={tmp_path / 'run'}",
                        env={"JOINTDIT_ROOT": str(tmp_path)}, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "HYDRA_FULL_ERROR" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "max_steps='abc'" in lines[0] and "whole number" in lines[0]
    assert "hint:" in result.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "mlflow.db").exists()  # refused before any work


def test_hydra_full_error_still_shows_the_traceback(tmp_path):
    result = run_module("jointdit.train", "batch_size=0", "logger=none", f"hydra.run.dir={tmp_path / 'run'}",
                        env={"JOINTDIT_ROOT": str(tmp_path), "HYDRA_FULL_ERROR": "1"}, timeout=120)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "jointdit.errors.ConfigError" in result.stderr


def test_run_cli_exit_codes_and_bugs_propagate(capsys):
    def fail(err):
        def fn():
            raise err
        return fn

    with pytest.raises(SystemExit) as exit_info:
        run_cli(fail(ConfigError("batch_size=0: must be ≥ 1", hint="set batch_size ≥ 1")))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: batch_size=0: must be ≥ 1\n  hint: set batch_size ≥ 1\n"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(fail(WriteError("disk full while writing /x")))
    assert exit_info.value.code == 1  # not the input's fault
    with pytest.raises(KeyError):  # a bug is not dressed up as a user error
        run_cli(fail(KeyError("loss")))
    assert run_cli(lambda: 7) == 7


# ----------------------------------------------------------------------------------------------
# 6. Config validation up front
# ----------------------------------------------------------------------------------------------


def _invalid(compose_cfg, *overrides: str, processes: int = 1) -> str:
    from jointdit.schema import validate

    with pytest.raises(JointditError) as info:
        validate(compose_cfg("train", list(overrides)), processes)
    return str(info.value)


def test_schema_names_every_bad_value_with_a_valid_one(compose_cfg):
    message = _invalid(compose_cfg, "max_steps=abc", "batch_size=0", "optim.lr=-1", "objective.drop_text=1.5",
                       "optim.schedule=linear", "train.nonfinite=maybe")
    assert "max_steps='abc': not a whole number" in message and "e.g. max_steps=300" in message
    assert "batch_size=0: must be ≥ 1" in message
    assert "optim.lr=-1: must be > 0" in message
    assert "objective.drop_text=1.5: must be ≥ 0 and ≤ 1" in message
    assert "optim.schedule='linear': unknown choice; choose one of cosine, constant" in message
    assert "train.nonfinite='maybe': unknown choice; choose one of skip, stop" in message


def test_schema_refuses_unknown_tasks_and_probabilities_not_summing_to_one(compose_cfg):
    message = _invalid(compose_cfg, "+objective.tasks.outpaint_v=0.1")  # (t2v is a task: diffusion/masks.py)
    assert "objective.tasks.outpaint_v" in message and "unknown training task(s) ['outpaint_v']" in message
    message = _invalid(compose_cfg, "objective.tasks.joint=1.0")
    assert "sum to 1.45, not 1" in message
    from jointdit.schema import validate

    validate(compose_cfg("train", ["objective.tasks.joint=0.45", "objective.tasks.a2v=0.25"]), 1)  # sums to 1: fine


def test_batch_size_not_a_multiple_of_micro_batch_times_processes_gives_the_nearest_valid_values(compose_cfg):
    message = _invalid(compose_cfg, "batch_size=6", "vram.micro_batch_size=4")
    assert "batch_size=6 is not a multiple of vram.micro_batch_size (4) x 1 process(es) = 4" in message
    assert "batch_size=4 or batch_size=8" in message and "vram.micro_batch_size=3" in message
    message = _invalid(compose_cfg, "batch_size=2", "vram.micro_batch_size=2", processes=2)
    assert "x 2 process(es) = 4" in message and "use batch_size=4" in message
    from jointdit.schema import validate

    validate(compose_cfg("train", ["batch_size=4", "vram.micro_batch_size=2"]), 2)  # 4 = 2 x 2 x 1: fine


def test_vram_budget_is_refused_when_more_than_the_machine_has_and_honoured_otherwise(compose_cfg):
    from jointdit.memory import detect_budget
    from jointdit.schema import budget_bytes

    have_gib = detect_budget("cpu") / 1024**3
    if torch.cuda.is_available():
        pytest.skip("checks the CPU budget")
    for profile in ("cpu", "auto"):
        message = _invalid(compose_cfg, f"vram={profile}", f"vram.budget_gb={have_gib * 4:.0f}")
        assert "vram.budget_gb=" in message and "GiB of available RAM" in message and "budget_gb=null" in message
    cfg = compose_cfg("train", ["vram=auto", "vram.budget_gb=1.5"])
    assert budget_bytes(cfg) == int(1.5 * 1024**3)  # handed to the memory planner
    assert budget_bytes(compose_cfg("train", ["vram=48gb"])) is None  # a GPU profile's budget is the card's


def test_missing_data_folder_is_refused_before_any_work(compose_cfg, tmp_path):
    message = _invalid(compose_cfg, "data=folder")
    assert "data.root=(not set)" in message and "set data.root=" in message
    with pytest.raises(DataError, match=r"data folder .*nowhere \(data.root\) does not exist"):
        from jointdit.schema import validate

        validate(compose_cfg("train", ["data=folder", f"data.root={tmp_path / 'nowhere'}"]), 1)


def test_sample_and_cache_configs_are_validated_too(compose_cfg, tmp_path):
    from jointdit.schema import validate

    with pytest.raises(ConfigError) as info:
        validate(compose_cfg("sample", [f"checkpoint={tmp_path / 'nope'}", "seeds=[a]", "steps=0"]))
    message = str(info.value)
    assert "checkpoint=" in message and "no such folder" in message and "seeds=['a']" in message
    assert "steps=0" in message
    with pytest.raises(ConfigError, match="split='everything'"):
        validate(compose_cfg("cache", ["split=everything"]))


def test_sample_timestep_shift_defaults_to_the_exports_rule(compose_cfg, tmp_path):
    from jointdit.sample import request_from_cfg
    from jointdit.schema import validate

    (tmp_path / "model").mkdir()
    cfg = compose_cfg("sample", [f"checkpoint={tmp_path / 'model'}"])
    request = request_from_cfg(cfg)
    assert request.shift_video is None and request.shift_audio is None  # None: the export's rule
    with pytest.raises(ConfigError, match="schedule.shift_video"):
        validate(compose_cfg("sample", [f"checkpoint={tmp_path / 'model'}", "schedule.shift_video=0"]))


def test_the_default_configs_pass(compose_cfg):
    from jointdit.schema import validate

    for overrides in ([], ["vram=48gb"], ["vram=auto"], ["experiment=demo"], ["stage=b", "vram=24gb"]):
        validate(compose_cfg("train", overrides), 1)
    validate(compose_cfg("cache"))


# ----------------------------------------------------------------------------------------------
# 8. Paths: list entries escaping data.root
# ----------------------------------------------------------------------------------------------


def _layout(root: Path, train_lines: list[str]) -> Path:
    for relative in ("dog/a.mp4", "dog/b.mp4"):
        (root / "videos" / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / "videos" / relative).write_bytes(b"x")
    (root / "train.txt").write_text("\n".join(train_lines) + "\n")
    (root / "test.txt").write_text("dog/b.mp4\n")
    return root


@pytest.mark.parametrize("entry", ["../../secret.mp4", "/etc/passwd", "dog/../../../x.mp4"])
def test_list_entries_outside_data_root_are_refused(tmp_path, entry):
    from jointdit.data.sources import FolderSource

    root = _layout(tmp_path / "data", ["dog/a.mp4", entry])
    with pytest.raises(DataError) as info:
        FolderSource(root).clips("train")
    assert f"train.txt line 2: entry {entry!r} points outside data.root" in str(info.value)
    assert FolderSource(root).clips("val")[0].path == root / "videos" / "dog" / "b.mp4"  # good lists still work


def test_symlinks_out_of_data_root_are_refused_but_a_linked_videos_folder_is_fine(tmp_path):
    from jointdit.data.sources import FolderSource

    outside = tmp_path / "elsewhere.mp4"
    outside.write_bytes(b"x")
    root = _layout(tmp_path / "data", ["dog/a.mp4", "dog/link.mp4"])
    (root / "videos" / "dog" / "link.mp4").symlink_to(outside)
    with pytest.raises(DataError, match=r"line 2: entry 'dog/link.mp4' is a link to .*elsewhere.mp4, outside"):
        FolderSource(root).clips("train")
    with pytest.raises(DataError, match="is a link to"):
        FolderSource(root, lists=None, val_fraction=0.0).clips("train")
    # videos/ itself on another disk (a symlinked folder) is a normal layout
    real = _layout(tmp_path / "disk", ["dog/a.mp4"])
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "videos").symlink_to(real / "videos")
    (linked / "train.txt").write_text("dog/a.mp4\n")
    assert len(FolderSource(linked).clips("train")) == 1


def test_metadata_paths_outside_data_root_are_refused(tmp_path):
    from jointdit.data.sources import FolderSource

    root = _layout(tmp_path / "data", ["dog/a.mp4"])
    (root / "metadata.jsonl").write_text(json.dumps({"path": "dog/a.mp4", "caption": "a dog"}) + "\n"
                                         + json.dumps({"path": "../../../etc/shadow", "caption": "x"}) + "\n")
    with pytest.raises(DataError, match=r"metadata.jsonl line 2: entry '../../../etc/shadow' points outside"):
        FolderSource(root).clips("train")


# ----------------------------------------------------------------------------------------------
# 9, 10, 12, 8. Atomic writes, disk full, stale temps, the output lock, umask
# ----------------------------------------------------------------------------------------------


def test_atomic_file_keeps_the_old_version_when_a_write_fails(tmp_path):
    from jointdit.safeio import atomic_file, write_text

    target = write_text(tmp_path / "metrics.json", "old")
    with pytest.raises(RuntimeError):
        with atomic_file(target, "w") as handle:
            handle.write("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_disk_full_names_the_path_leaves_no_temp_and_keeps_the_last_good_copy(tmp_path):
    from jointdit.safeio import atomic_dir

    final = tmp_path / "checkpoints" / "step_000010"
    with atomic_dir(final) as tmp:
        (tmp / "model.safetensors").write_bytes(b"good")
    with pytest.raises(WriteError) as info:
        with atomic_dir(final) as tmp:
            (tmp / "model.safetensors").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # injected: the disk filled up
    assert f"disk full while writing {final}" in str(info.value) and "free space" in str(info.value)
    assert info.value.exit_code == 1
    assert (final / "model.safetensors").read_bytes() == b"good"
    assert sorted(p.name for p in final.parent.iterdir()) == ["step_000010"]  # no temp left behind


def _tiny_tmpfs(path: Path) -> bool:
    path.mkdir()
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_real_full_disk_gives_write_error(tmp_path):
    """The same, on a real 64 KiB tmpfs (needs root to mount; skipped otherwise)."""
    from jointdit.safeio import atomic_file, write_bytes

    disk = tmp_path / "disk"
    if not _tiny_tmpfs(disk):
        pytest.skip("cannot mount a tmpfs here")
    try:
        write_bytes(disk / "keep.bin", b"k" * 1000)
        with pytest.raises(WriteError, match=f"disk full while writing {disk / 'big.bin'}"):
            with atomic_file(disk / "big.bin") as handle:
                handle.write(b"x" * 200_000)
        assert sorted(p.name for p in disk.iterdir()) == ["keep.bin"]
        assert (disk / "keep.bin").read_bytes() == b"k" * 1000
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_written_files_follow_the_umask_not_0600(tmp_path):
    from jointdit.safeio import atomic_dir, write_text

    old = os.umask(0o027)
    try:
        path = write_text(tmp_path / "a.json", "{}")
        with atomic_dir(tmp_path / "export") as tmp:
            save_file({"w": torch.ones(2)}, str(tmp / "w.safetensors"))  # safetensors writes 0600
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "export" / "w.safetensors").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "export").stat().st_mode) == 0o750


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temps_of_dead_writers_are_swept_but_a_live_writers_are_kept(tmp_path):
    from jointdit.safeio import sweep_stale_temps

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = tmp_path / f".last.tmp{_dead_pid()}"
        dead.mkdir()
        (dead / "half.safetensors").write_bytes(b"x")
        alive = tmp_path / f".best.tmp{live.pid}"
        alive.mkdir()
        cache_tmp = tmp_path / f".tmp-shard-00001.safetensors.{_dead_pid()}"
        cache_tmp.write_bytes(b"x")
        trainer_tmp = tmp_path / ".tmp_step_000100"  # no PID: stale only for the folder's lock holder
        trainer_tmp.mkdir()
        (tmp_path / "step_000050").mkdir()
        removed = sweep_stale_temps(tmp_path)
        assert sorted(removed) == sorted([dead, cache_tmp])
        assert alive.exists() and trainer_tmp.exists() and (tmp_path / "step_000050").exists()
        assert sweep_stale_temps(tmp_path, own_folder=True) == [trainer_tmp]
    finally:
        live.kill()
        live.wait()


_HOLD = """
import sys, time
from jointdit.safeio import OutputLock
lock = OutputLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_writer_of_one_output_folder_is_refused_naming_the_owner_pid(tmp_path):
    from jointdit.safeio import OutputLock

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    owner = subprocess.Popen([PYTHON, "-c", _HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert owner.stdout.readline().strip() == "locked"
        with pytest.raises(LockError) as info:
            OutputLock(tmp_path / "run").acquire()
        assert f"is in use by another run (PID {owner.pid}" in str(info.value)
        assert f"wait for PID {owner.pid}" in str(info.value)
    finally:
        owner.send_signal(signal.SIGKILL)  # killed like an OOM'd job: the kernel drops its lock
        owner.wait()
    with OutputLock(tmp_path / "run") as lock:  # a resume is never locked out by a dead owner
        assert lock.held and lock.owner()["pid"] == os.getpid()


# ----------------------------------------------------------------------------------------------
# 13. No pickle from untrusted folders
# ----------------------------------------------------------------------------------------------


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _real_checkpoint(folder: Path) -> Path:
    """An Accelerate save_state folder (model, optimizer, scheduler, RNG) plus trainer_state.json."""
    from accelerate import Accelerator

    from jointdit.training import reset_accelerate

    accelerator = Accelerator(cpu=True)
    try:
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.AdamW(model.parameters())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        model(torch.ones(1, 3)).sum().backward()
        optimizer.step()
        accelerator.save_state(str(folder), safe_serialization=True)
    finally:
        reset_accelerate()
    (folder / "trainer_state.json").write_text(json.dumps({"step": 1, "history": []}))
    return folder


def test_a_crafted_pickle_in_a_checkpoint_is_refused_and_never_runs(tmp_path):
    from jointdit.safeload import verify_checkpoint_folder

    folder = _real_checkpoint(tmp_path / "step_000001")
    assert verify_checkpoint_folder(folder)["step"] == 1  # Accelerate's own files pass
    marker = tmp_path / "pwned"
    torch.save({"random_state": _Payload(str(marker))}, folder / "random_states_0.pkl")
    with pytest.raises(CheckpointError) as info:
        verify_checkpoint_folder(folder)
    assert "random_states_0.pkl would unpickle arbitrary objects (posix.system)" in str(info.value)
    assert not marker.exists()


def test_truncated_weights_and_pickled_model_folders_are_refused(tmp_path):
    from jointdit.safeload import safe_torch_load, verify_model_folder

    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "JointDiT"}))
    save_file({"w": torch.ones(1000)}, str(folder / "diffusion_pytorch_model.safetensors"))
    assert verify_model_folder(folder) == folder
    data = (folder / "diffusion_pytorch_model.safetensors").read_bytes()
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors is not a readable safetensors"):
        verify_model_folder(folder)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"w": torch.ones(2)}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="holds pickled weights .*pickles are never loaded"):
        verify_model_folder(folder)
    marker = tmp_path / "pwned"
    torch.save(_Payload(str(marker)), tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights-only load refuses"):
        safe_torch_load(tmp_path / "evil.pt")
    assert not marker.exists()


def test_shard_checks_name_missing_truncated_and_bit_flipped_shards(tmp_path):
    from jointdit.safeload import SHARD_SHA_KEY, damaged_shards, file_sha256

    rows = []
    for n in range(3):
        name = f"shard-{n:05d}.safetensors"
        save_file({f"c{n}.video": torch.randn(64)}, str(tmp_path / name))
        rows.append({"id": f"c{n}", "shard": name, SHARD_SHA_KEY: file_sha256(tmp_path / name)})
    assert damaged_shards(tmp_path, rows) == {}
    data = bytearray((tmp_path / "shard-00001.safetensors").read_bytes())
    data[-3] ^= 0xFF  # one flipped byte in the tensor data: the header still reads
    (tmp_path / "shard-00001.safetensors").write_bytes(bytes(data))
    (tmp_path / "shard-00002.safetensors").write_bytes(data[: len(data) // 2])
    problems = damaged_shards(tmp_path, rows)
    assert problems["shard-00001.safetensors"].startswith("corrupt (its sha256 differs")
    assert problems["shard-00002.safetensors"].startswith("truncated")
    (tmp_path / "shard-00000.safetensors").unlink()
    assert damaged_shards(tmp_path, rows)["shard-00000.safetensors"] == "missing"


# ----------------------------------------------------------------------------------------------
# 1. Non-finite guard, finite saves, pruning
# ----------------------------------------------------------------------------------------------


def test_nonfinite_skip_counts_and_stops_after_max_consecutive_naming_step_and_checkpoint(tmp_path):
    from jointdit.guards import NonFiniteGuard

    good = tmp_path / "checkpoints" / "step_000010"
    guard = NonFiniteGuard("skip", max_consecutive=3, last_good=lambda: good)
    assert guard.observe(11, 0.5, 1.0) is True
    assert guard.observe(12, float("nan"), None) is False
    assert guard.observe(13, 0.4, float("inf")) is False
    assert guard.observe(14, 0.4, 2.0) is True and guard.consecutive == 0 and guard.skipped == 2
    assert guard.observe(15, float("inf"), float("nan")) is False
    assert guard.observe(16, float("nan"), float("nan")) is False
    with pytest.raises(NonFiniteError) as info:
        guard.observe(17, float("nan"), float("nan"))
    message = str(info.value)
    assert "non-finite loss at step 17" in message and "3 consecutive steps skipped (train.max_nonfinite=3)" in message
    assert f"last good checkpoint: {good}" in message and f"checkpoint.resume={good}" in message
    assert guard.state_dict() == {"skipped": 5, "consecutive": 3}


def test_nonfinite_stop_stops_at_the_first_bad_step():
    from jointdit.guards import NonFiniteGuard

    guard = NonFiniteGuard("stop", max_consecutive=10, last_good=lambda: None)
    with pytest.raises(NonFiniteError, match="non-finite gradients at step 3 .*train.nonfinite=stop; no checkpoint"):
        guard.observe(3, torch.tensor(0.2), torch.tensor(float("inf")))


def test_non_finite_weights_are_never_written():
    from jointdit.guards import require_finite

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    require_finite(model, "checkpoint step_000010")
    with torch.no_grad():
        model[1].bias[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"refusing to write export/last at step 20: 1 tensor\(s\) hold NaN/Inf "
                                             r"\(1.bias\)"):
        require_finite(model, "export/last", step=20)


def test_pruning_never_deletes_the_newest_good_checkpoint(tmp_path):
    from jointdit.guards import checkpoint_is_good, checkpoints_to_prune

    folders = [tmp_path / f"step_{s:06d}" for s in (10, 20, 30, 40)]
    for folder in folders:
        folder.mkdir()
    good = {folders[0], folders[1]}
    assert checkpoints_to_prune(folders, 2, lambda p: p in good) == [folders[0]]  # step 20 survives
    assert checkpoints_to_prune(folders, 2) == folders[:2]
    assert checkpoints_to_prune(folders, 0) == []
    real = _real_checkpoint(tmp_path / "real")
    assert checkpoint_is_good(real) and not checkpoint_is_good(folders[2])  # an empty folder is no checkpoint


# ----------------------------------------------------------------------------------------------
# 2, 11. stage.init_from: auto, explicit, MLflow run id, refusal; differing keys listed
# ----------------------------------------------------------------------------------------------


def _export(folder: Path, stage: str = "a", depth: int = 2, size: int = 32) -> Path:
    from jointdit.checkpoints import export_model
    from jointdit.models import build_model

    model = build_model("tiny", hidden_size=64, depth=depth, num_heads=2, video_in_channels=192, audio_in_channels=1,
                        video_latent_fps=8.0, audio_latent_fps=100.0)
    codec = {"name": "pixel_mel", "video": {"space_to_depth": 8},
             "audio": {"sample_rate": 16000, "n_fft": 1024, "hop_length": 160, "win_length": 1024, "n_mels": 64,
                       "fmin": 0.0, "fmax": 8000.0, "log_floor": -11.512925, "log_ceil": 2.302585}}
    meta = {"step": 3, "stage": stage, "codec": codec,
            "data": {"name": "synthetic", "size": size, "fps": 8, "seconds": 1.0, "sample_rate": 16000}}
    return export_model(model, folder, meta)


SMALL_MODEL = ["model.hidden_size=64", "model.depth=2", "model.num_heads=2", "data.size=32", "stage=b"]


def test_init_from_auto_takes_the_newest_matching_stage_a_export(compose_cfg, tmp_path):
    from jointdit.resolve_init import resolve_init_from

    outputs = tmp_path / "outputs"
    older = _export(outputs / "2026-01-01" / "10-00-00" / "export" / "last")
    time.sleep(0.02)
    newer = _export(tmp_path / "multirun" / "2026-01-02" / "10-00-00" / "0" / "export" / "last")
    time.sleep(0.02)
    _export(outputs / "2026-01-03" / "10-00-00" / "export" / "last", depth=4)  # newest, other architecture
    _export(outputs / "2026-01-03" / "11-00-00" / "export" / "last", stage="b")  # a Stage B run: never a source
    source = resolve_init_from(compose_cfg("train", [*SMALL_MODEL, "logger=none"]))
    assert source.path == newer and source.how == "auto" and source.tags()["init_from"] == str(newer)
    assert older != newer


def test_init_from_auto_without_stage_a_refuses_with_the_stage_a_command(compose_cfg, tmp_path):
    from jointdit.resolve_init import resolve_init_from

    with pytest.raises(InitFromError) as info:
        resolve_init_from(compose_cfg("train", [*SMALL_MODEL, "logger=none"]))
    message = str(info.value)
    assert "stage.init_from=auto found none" in message
    assert "python -m jointdit.train stage=a" in message
    _export(tmp_path / "outputs" / "d" / "t" / "export" / "last", depth=4)
    with pytest.raises(InitFromError, match=r"not matching .*model.depth: 4 → 2"):
        resolve_init_from(compose_cfg("train", [*SMALL_MODEL, "logger=none"]))


def test_init_from_a_changed_architecture_lists_the_differing_keys(compose_cfg, tmp_path):
    from jointdit.resolve_init import resolve_init_from

    folder = _export(tmp_path / "a" / "export" / "last")
    cfg = compose_cfg("train", ["model.hidden_size=64", "model.depth=6", "model.num_heads=2", "data.size=64",
                                "stage=b", f"stage.init_from={folder}"])
    with pytest.raises(InitFromError) as info:
        resolve_init_from(cfg)
    assert "does not fit this model: model.depth: 2 → 6; data.size: 32 → 64" in str(info.value)
    assert "blocks.0" not in str(info.value)  # keys of the config, not of the state dict


def test_init_from_an_mlflow_run_id_and_auto_through_mlflow(compose_cfg, tmp_path):
    from mlflow.tracking import MlflowClient

    from jointdit.resolve_init import resolve_init_from

    elsewhere = tmp_path / "scratch" / "job7"  # not under outputs/ or multirun/: only MLflow knows it
    _export(elsewhere / "export" / "last")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.create_run(client.create_experiment("train"), tags={"stage": "a"})
    client.log_param(run.info.run_id, "paths.output_dir", str(elsewhere))
    client.set_terminated(run.info.run_id)
    source = resolve_init_from(compose_cfg("train", [*SMALL_MODEL, f"stage.init_from={run.info.run_id}"]))
    assert source.path == elsewhere / "export" / "last" and source.run_id == run.info.run_id
    source = resolve_init_from(compose_cfg("train", SMALL_MODEL))
    assert source.how == "auto" and source.run_id == run.info.run_id
    with pytest.raises(InitFromError, match="MLflow run not found"):
        resolve_init_from(compose_cfg("train", [*SMALL_MODEL, "stage.init_from=" + "0" * 32]))


def test_bare_stage_b_without_stage_a_is_refused_before_any_work(tmp_path):
    result = run_module("jointdit.train", "stage=b", "vram=48gb", f"hydra.run.dir={tmp_path / 'run'}",
                        env={"JOINTDIT_ROOT": str(tmp_path)}, timeout=180)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "error: stage=b starts from a Stage A model" in result.stderr
    assert "train Stage A first: `python -m jointdit.train stage=a vram=48gb`" in result.stderr
    assert not (tmp_path / "data").exists()  # no data or cache work happened


# ----------------------------------------------------------------------------------------------
# 5. MLflow: jobs starting together on a fresh mlflow.db all get their runs
# ----------------------------------------------------------------------------------------------

_START_RUN = """
import sys, time, warnings
from omegaconf import OmegaConf
from jointdit.tracking import Tracker
cfg = OmegaConf.create({"name": "mlflow", "tracking_uri": sys.argv[1], "experiment_name": "train"})
while time.time() < float(sys.argv[2]):
    time.sleep(0.001)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    tracker = Tracker(cfg, run_name="job")
print("RUN", tracker.run_id, [str(w.message)[:300] for w in caught if "MLflow" in str(w.message)])
tracker.end()
"""


@pytest.mark.slow  # four processes importing MLflow: ~30 s on a quiet 2-core machine, minutes on a busy one
def test_jobs_starting_together_on_a_fresh_mlflow_db_all_get_their_runs(tmp_path):
    """Without the store lock, 3 of 4 such jobs lost their run to the schema-migration race."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.time() + 6  # all four past their imports, then go at once
    procs = [subprocess.Popen([PYTHON, "-c", _START_RUN, uri, str(start)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(4)]
    outputs = [proc.communicate(timeout=240) for proc in procs]
    run_ids = []
    for stdout, stderr in outputs:
        line = next(line for line in stdout.splitlines() if line.startswith("RUN"))
        assert line.startswith("RUN ") and "[]" in line and "None" not in line, (line, stderr[-2000:])
        run_ids.append(line.split()[1])
    client = MlflowClient(uri)
    stored = client.search_runs([client.get_experiment_by_name("train").experiment_id])
    assert sorted(r.info.run_id for r in stored) == sorted(run_ids) and len(set(run_ids)) == 4


# ----------------------------------------------------------------------------------------------
# 15. Resume tests that can see bugs an interrupted and an uninterrupted run would share
# ----------------------------------------------------------------------------------------------


def _epoch_batches(size: int, batch: int, seed: int, epoch: int, rank: int = 0, world: int = 1, offset: int = 0):
    from jointdit.training import EpochBatchSampler

    sampler = EpochBatchSampler(size, batch, seed, rank, world)
    sampler.start(epoch, offset)
    return list(sampler)


def test_epoch_batch_sampler_reshuffles_every_epoch_and_repeats_per_seed_and_epoch():
    epochs = [_epoch_batches(24, 4, seed=3, epoch=e) for e in range(4)]
    orders = [tuple(i for b in batches for i, _ in b) for batches in epochs]
    assert len(set(orders)) == 4  # a different order in every epoch (an epoch stuck at 0 repeats one)
    assert all(sorted(order) == list(range(24)) for order in orders)  # each epoch visits every clip once
    assert all(e == epoch for epoch, batches in enumerate(epochs) for b in batches for _, e in b)  # crops see the epoch
    assert _epoch_batches(24, 4, seed=3, epoch=2) == epochs[2]  # same (seed, epoch): same batches
    assert _epoch_batches(24, 4, seed=4, epoch=2) != epochs[2]
    assert _epoch_batches(24, 4, seed=3, epoch=2, offset=4) == epochs[2][4:]  # resume mid-epoch: the suffix


def test_epoch_batch_sampler_ranks_split_each_step_without_overlap():
    ranks = [_epoch_batches(24, 3, seed=0, epoch=1, rank=r, world=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 4
    for step in range(4):
        a, b = ({i for i, _ in ranks[r][step]} for r in range(2))
        assert not a & b
    seen = sorted(i for r in ranks for batch in r for i, _ in batch)
    assert seen == list(range(24))


KILL_SMALL = ["data.num_clips=8", "data.size=32", "data.seconds=1.0", "data.val_fraction=0.25", "model.hidden_size=64",
              "model.depth=2", "model.num_heads=2", "vram.micro_batch_size=2", "batch_size=2", "optim.warmup_steps=2",
              "log_every=5", "logger=none", "sample_every=-1", "max_steps=40", "checkpoint.every=2",
              "checkpoint.keep=2", "ema.decay=0.9"]


@pytest.mark.slow
def test_sigkill_at_ten_random_steps_resumes_exactly_including_ema(tmp_path):
    """A run killed with SIGKILL ten times at random moments ends with the uninterrupted run's losses AND
    its exported (EMA) weights bit for bit; the epoch advances (6 clips / batch 2 = 3 steps an epoch)."""
    import random

    from safetensors.torch import load_file

    # One math thread: a multi-threaded reduction may change its order under machine load (an ulp apart).
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOINTDIT_")} | {
        "JOINTDIT_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    straight = tmp_path / "straight"
    result = subprocess.run([PYTHON, "-m", "jointdit.train", *KILL_SMALL, f"hydra.run.dir={straight}"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rng = random.Random(15)
    run_dir, kills = tmp_path / "killed", 0
    for attempt in range(40):
        resume = ["checkpoint.resume=auto"] if attempt else []
        proc = subprocess.Popen([PYTHON, "-m", "jointdit.train", *KILL_SMALL, *resume, f"hydra.run.dir={run_dir}"],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        if kills < 10:
            have = {p.name for p in (run_dir / "checkpoints").glob("step_*")} if (run_dir / "checkpoints").exists() else set()
            deadline = time.time() + 600
            while proc.poll() is None and time.time() < deadline:  # wait for a new checkpoint, then a random moment
                now = {p.name for p in (run_dir / "checkpoints").glob("step_*")} if (run_dir / "checkpoints").exists() else set()
                if now - have:
                    break
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.6))
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                kills += 1
        proc.wait(timeout=900)
        if (run_dir / "metrics.json").exists():
            break
    assert kills == 10 and (run_dir / "metrics.json").exists()

    def losses(folder: Path) -> list[float]:
        return [h["loss"] for h in json.loads((folder / "metrics.json").read_text())["history"]]

    assert len(losses(run_dir)) == 40 and losses(run_dir) == losses(straight)  # exact, not approximately
    ours = load_file(run_dir / "export" / "last" / "diffusion_pytorch_model.safetensors")
    theirs = load_file(straight / "export" / "last" / "diffusion_pytorch_model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


_HALF_BROKEN_SERVER = """
import http.server
class Handler(http.server.BaseHTTPRequestHandler):
    def _reply(self):
        ok = self.path.split("?")[0].rstrip("/").endswith("/health")
        body = b"OK" if ok else b'{"error_code": "INTERNAL_ERROR", "message": "database is locked"}'
        self.send_response(200 if ok else 500)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = do_PATCH = do_DELETE = _reply
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def test_a_server_that_answers_health_but_fails_its_api_costs_seconds_and_one_warning(monkeypatch):
    """Before: MLflow's retries sat on the 500s for 277 s before giving up."""
    import warnings

    from omegaconf import OmegaConf

    from jointdit.tracking import HTTP_LIMITS, Tracker

    for key in HTTP_LIMITS:
        monkeypatch.delenv(key, raising=False)  # restored after the test: the Tracker sets them process-wide
    server = subprocess.Popen([PYTHON, "-c", _HALF_BROKEN_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        cfg = OmegaConf.create({"name": "mlflow", "tracking_uri": f"http://127.0.0.1:{port}", "experiment_name": "t"})
        started = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tracker = Tracker(cfg, run_name="job")
            tracker.log_metrics({"loss": 1.0}, 1)  # training goes on: logging is a no-op now
        elapsed = time.perf_counter() - started
    finally:
        server.kill()
        server.wait()
    assert not tracker.active and elapsed < 15, elapsed
    messages = [str(w.message) for w in caught if "MLflow" in str(w.message)]
    assert len(messages) == 1 and "carrying on without tracking" in messages[0]


# ----------------------------------------------------------------------------------------------
# The trainer (in-process, Hydra compose(), paths at tmp_path): points 1, 2, 3, 6, 9, 10, 11, 12, 13
# ----------------------------------------------------------------------------------------------

TRAIN_SMALL = ["data.num_clips=8", "data.size=32", "data.seconds=1.0", "data.val_fraction=0.25", "model.hidden_size=64",
               "model.depth=2", "model.num_heads=2", "vram.micro_batch_size=2", "batch_size=2", "optim.warmup_steps=2",
               "logger=none", "sample_every=-1"]


@pytest.fixture
def train_cfg(compose_cfg, tmp_path):
    def make(*overrides: str, run: str = "run"):
        return compose_cfg("train", [*TRAIN_SMALL, f"paths.output_dir={tmp_path / run}", *overrides])

    return make


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    name = "diffusion_pytorch_model.safetensors" if (folder / "config.json").exists() else "model.safetensors"
    return load_file(str(folder / name))


def _all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(t).all() for t in tensors.values())


def test_nonfinite_steps_stop_the_run_naming_the_step_and_last_good_checkpoint(train_cfg, tmp_path):
    """lr=1e30: step 1 is finite, its update makes every later forward overflow (NaN from step 2 on)."""
    from jointdit.training import train

    blow_up = ["optim.lr=1e30", "optim.warmup_steps=0", "checkpoint.every=1", "max_steps=6", "log_every=1"]
    with pytest.raises(NonFiniteError) as info:
        train(train_cfg(*blow_up, "train.nonfinite=skip", "train.max_nonfinite=2"))
    checkpoints = tmp_path / "run" / "checkpoints"
    message = str(info.value)
    assert "non-finite loss at step 3" in message and "2 consecutive steps skipped (train.max_nonfinite=2)" in message
    assert f"last good checkpoint: {checkpoints / 'step_000002'}" in message
    assert not (tmp_path / "run" / "export" / "last").exists()  # nothing exported from a broken run
    for folder in checkpoints.glob("step_*"):
        assert _all_finite(_weights(folder)), folder
    # step 2 was skipped: its checkpoint holds step 1's weights, untouched by the NaN step
    assert all(torch.equal(a, b) for a, b in zip(_weights(checkpoints / "step_000001").values(),
                                                 _weights(checkpoints / "step_000002").values()))
    # a resumed run meets the same NaN at its first step: a clear stop, never a KeyError on a missing metric
    with pytest.raises(NonFiniteError, match="non-finite loss at step 3 .*train.nonfinite=stop"):
        train(train_cfg(*blow_up, "train.nonfinite=stop", "checkpoint.resume=auto"))


def _poison_one_training_clip(cfg) -> str:
    """Write NaN into one cached training clip (as a corrupt encoder output would); returns its id."""
    from safetensors import safe_open

    from jointdit.data.cache import cache_dir_for, read_index
    from jointdit.data.dataset import ensure_cache

    out = ensure_cache(cfg, progress=False)
    row = read_index(cache_dir_for(cfg.data, cfg.codec, cfg.paths.cache_dir), "train")[0]
    shard = out / row["shard"]
    with safe_open(str(shard), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    tensors[row["tensors"]["video"]] = torch.full_like(tensors[row["tensors"]["video"]], float("nan"))
    save_file(tensors, str(shard), metadata=metadata)
    _reseal(out, row["shard"])  # as if the encoder itself had produced the NaN: the checksum matches
    return row["id"]


def _reseal(cache_dir: Path, shard: str) -> None:
    from jointdit.safeload import SHARD_SHA_KEY, file_sha256

    index = cache_dir / "index.jsonl"
    rows = [json.loads(line) for line in index.read_text().splitlines() if line.strip()]
    digest = file_sha256(cache_dir / shard)
    index.write_text("".join(json.dumps({**r, SHARD_SHA_KEY: digest} if r["shard"] == shard else r) + "\n"
                             for r in rows))


def test_a_corrupt_cache_shard_is_named_with_the_command_that_rebuilds_just_it(train_cfg, tmp_path):
    import shlex

    from jointdit.data.cache import read_index
    from jointdit.data.dataset import LatentDataset, ensure_cache
    from jointdit.errors import CacheCorruptError
    from jointdit.safeload import SHARD_SHA_KEY, damaged_shards

    cfg = train_cfg("data.num_clips=8")
    out = ensure_cache(cfg, progress=False)
    rows = read_index(out)
    assert rows and all(len(r[SHARD_SHA_KEY]) == 64 for r in rows)  # every shard has a checksum in the index
    train_rows = [r for r in rows if r["split"] == "train"]
    bad = train_rows[0]["shard"]
    before = {p.name: p.read_bytes() for p in out.glob("shard-*.safetensors") if p.name != bad}
    data = bytearray((out / bad).read_bytes())
    data[-5] ^= 0x55  # a flipped byte in the tensor data
    (out / bad).write_bytes(bytes(data))
    dataset = LatentDataset(out, "train", seed=0)
    with pytest.raises(CacheCorruptError) as info:
        [dataset[i] for i in range(len(dataset))]
    message = str(info.value)
    assert f"cache shard {out / bad} is corrupt" in message and "python -m jointdit.cache" in message
    command = message.split("rebuild it: `")[1].split("`")[0]
    result = subprocess.run([PYTHON, "-m", *shlex.split(command)[2:]], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"shard {out / bad} is corrupt" in result.stdout  # re-running the cache detected it ...
    after = read_index(out)
    assert damaged_shards(out, after) == {}  # ... and repaired it
    assert sorted(r["id"] for r in after) == sorted(r["id"] for r in rows)
    assert all((out / name).read_bytes() == blob for name, blob in before.items())  # nothing else was rewritten
    assert len(LatentDataset(out, "train", seed=0)[0]["video"]) > 0


def test_nonfinite_skip_drops_the_update_counts_it_and_the_run_finishes_with_finite_weights(train_cfg, tmp_path):
    """One NaN clip among 6 (3 steps an epoch): steps that draw it are skipped, the rest train."""
    from jointdit.training import train

    cfg = train_cfg("max_steps=6", "checkpoint.every=3", "train.nonfinite=skip", "train.max_nonfinite=3", "ema.enabled=false")
    _poison_one_training_clip(cfg)
    metrics = train(cfg)
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    skipped = [h["step"] for h in history if not np_isfinite(h["loss"])]
    assert len(skipped) == 2 and metrics["nonfinite_skipped"] == 2.0  # once per epoch, counted
    assert len(history) == 6 and all(np_isfinite(h["loss"]) for h in history if h["step"] not in skipped)
    assert _all_finite(_weights(tmp_path / "run" / "export" / "last"))


def np_isfinite(value: float) -> bool:
    import math

    return isinstance(value, (int, float)) and math.isfinite(value)


def test_resume_remembers_the_best_validation_loss(train_cfg, tmp_path):
    """export/best holds the model of the lowest validation loss seen, across a resume — even one from an
    older checkpoint, whose history never saw that loss."""
    from jointdit.training import train

    train(train_cfg("max_steps=6", "checkpoint.every=2", "checkpoint.keep=0", "optim.lr=3e-3"))
    first = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    best = tmp_path / "run" / "export" / "best"
    best_before = (json.loads((best / "jointdit.json").read_text())["step"], _weights(best))
    # back to step 2: the replayed steps 3-4 validate worse than step 6 did
    train(train_cfg("max_steps=4", "checkpoint.every=2", "optim.lr=3e-3",
                    f"checkpoint.resume={tmp_path / 'run' / 'checkpoints' / 'step_000002'}"))
    second = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    # best is judged with the weights it exports: the EMA's validation loss when EMA is on
    vals = [(h.get("val_loss_ema", h["val_loss"]), "first", h["step"]) for h in first if "val_loss" in h]
    vals += [(h.get("val_loss_ema", h["val_loss"]), "second", h["step"]) for h in second if "val_loss" in h and h["step"] > 2]
    _, run_of_best, step_of_best = min(vals)
    meta = json.loads((best / "jointdit.json").read_text())
    assert (meta["step"], meta["val_loss"]) == (step_of_best, min(vals)[0])
    if run_of_best == "first":  # the resumed run found nothing better: export/best was left alone
        assert meta["step"] == best_before[0] and all(torch.equal(v, best_before[1][k]) for k, v in _weights(best).items())


def test_a_run_refuses_an_output_folder_another_live_run_writes(train_cfg, tmp_path):
    from jointdit.training import train

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    owner = subprocess.Popen([PYTHON, "-c", _HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert owner.stdout.readline().strip() == "locked"
        with pytest.raises(LockError, match=f"in use by another run \\(PID {owner.pid}"):
            train(train_cfg("max_steps=1"))
        assert not (tmp_path / "run" / "checkpoints").exists()
    finally:
        owner.kill()
        owner.wait()


def test_resume_checks_the_checkpoint_before_loading_and_sweeps_stale_temps(train_cfg, tmp_path):
    from jointdit.training import train

    train(train_cfg("max_steps=2", "checkpoint.every=2"))
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000002"
    files = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    # 11. a changed architecture: the differing config keys, not a state-dict dump
    with pytest.raises(CheckpointError) as info:
        train(train_cfg("max_steps=4", "checkpoint.every=2", "model.depth=3", "checkpoint.resume=auto"))
    assert "model.depth: 2 → 3" in str(info.value) and "blocks." not in str(info.value)
    # 13. a crafted pickle planted in the checkpoint is refused, and its code never runs
    marker = tmp_path / "pwned"
    torch.save({"step": 2, "x": _Payload(str(marker))}, checkpoint / "random_states_0.pkl")
    with pytest.raises(CheckpointError, match="random_states_0.pkl would unpickle arbitrary objects"):
        train(train_cfg("max_steps=4", "checkpoint.every=2", "checkpoint.resume=auto"))
    assert not marker.exists()
    (checkpoint / "random_states_0.pkl").write_bytes(files["random_states_0.pkl"])
    # 10. temps of a killed writer are swept at start; the resume then completes
    stale = [tmp_path / "run" / "checkpoints" / ".tmp_step_000004", tmp_path / "run" / "export" / f".last.tmp{_dead_pid()}"]
    for folder in stale:
        folder.mkdir(parents=True)
        (folder / "half.safetensors").write_bytes(b"x")
    metrics = train(train_cfg("max_steps=4", "checkpoint.every=2", "checkpoint.resume=auto"))
    assert metrics["step"] == 4.0 and not any(folder.exists() for folder in stale)


def test_disk_full_while_checkpointing_keeps_the_last_good_checkpoint(train_cfg, tmp_path, monkeypatch):
    from accelerate import Accelerator

    from jointdit.safeload import verify_checkpoint_folder
    from jointdit.training import train

    original = Accelerator.save_state

    def fill_disk_at_step_4(self, output_dir=None, **kwargs):
        written = original(self, output_dir, **kwargs)
        if "step_000004" in str(output_dir):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # injected after the files were half written
        return written

    monkeypatch.setattr(Accelerator, "save_state", fill_disk_at_step_4)
    with pytest.raises(WriteError) as info:
        train(train_cfg("max_steps=6", "checkpoint.every=2"))
    root = tmp_path / "run" / "checkpoints"
    assert f"disk full while writing {root / 'step_000004'}" in str(info.value)
    assert sorted(p.name for p in root.iterdir()) == ["step_000002"]  # no temp left, the last good one intact
    assert verify_checkpoint_folder(root / "step_000002")["step"] == 2
    mask = os.umask(0)
    os.umask(mask)
    for path in (root / "step_000002").iterdir():  # 8. the user's umask, not safetensors' 0600
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path


def test_disk_full_while_caching_names_the_shard_and_keeps_what_was_cached(compose_cfg, tmp_path, monkeypatch):
    import safetensors.torch

    from jointdit.data.cache import read_index
    from jointdit.data.dataset import ensure_cache
    from jointdit.safeload import damaged_shards

    cfg = compose_cfg("train", [*TRAIN_SMALL, "+cache.shard_size=2"])
    original, calls = safetensors.torch.save_file, []

    def fill_disk_at_the_third_shard(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 3:
            Path(filename).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # injected
        return original(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", fill_disk_at_the_third_shard)
    with pytest.raises(WriteError, match=r"disk full while writing .*shard-00002.safetensors"):
        ensure_cache(cfg, progress=False)
    out = next((tmp_path / "data" / "cache").iterdir())
    assert not list(out.glob(".tmp-*"))  # no temp left behind
    rows = read_index(out)
    assert len(rows) == 4 and damaged_shards(out, rows) == {}  # the two shards written before are intact
    monkeypatch.setattr(safetensors.torch, "save_file", original)
    ensure_cache(cfg, progress=False)  # space again: the re-run completes the cache
    assert len(read_index(out)) == 8


def test_vram_budget_is_honoured_on_cpu(train_cfg, tmp_path):
    from jointdit.memory import MemoryPlanError
    from jointdit.training import train

    if torch.cuda.is_available():
        pytest.skip("checks the CPU budget")
    with pytest.raises(MemoryPlanError, match="budget"):
        train(train_cfg("max_steps=1", "vram.budget_gb=0.01"))  # was ignored on vram=cpu: the run trained
    assert not (tmp_path / "data").exists()


@pytest.mark.slow
def test_stage_a_then_the_bare_stage_b_command_starts_from_stage_a(tmp_path):
    """The headline: `python -m jointdit.train stage=b vram=48gb` (+ the small set-up) after a Stage A run."""
    from mlflow.tracking import MlflowClient

    small = [o for o in TRAIN_SMALL if not o.startswith(("logger", "vram.micro", "batch_size"))]
    small += ["vram.micro_batch_size=2", "batch_size=2", "max_steps=2", "checkpoint.every=2", "ema.enabled=false"]
    env = {"JOINTDIT_ROOT": str(tmp_path)}
    stage_a = run_module("jointdit.train", *small, env=env, timeout=900)  # default folder: outputs/<date>/<time>
    assert stage_a.returncode == 0, stage_a.stderr[-3000:]
    export_a = next((tmp_path / "outputs").glob("*/*/export/last"))
    stage_b = run_module("jointdit.train", "stage=b", "vram=48gb", *small, f"hydra.run.dir={tmp_path / 'b'}",
                         env=env, timeout=900)
    assert stage_b.returncode == 0, stage_b.stderr[-3000:]
    assert f"stage.init_from=auto: starting from {export_a}" in stage_b.stdout
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("train").experiment_id], "tags.stage = 'b'")
    assert runs[0].data.tags["init_from"] == str(export_a)
    before, after = _weights(export_a), _weights(tmp_path / "b" / "export" / "last")
    frozen = [k for k in before if not k.startswith(("blocks.0.video.", "blocks.0.audio.", "blocks.1.video.",
                                                      "blocks.1.audio.", "video_in.", "audio_in.", "video_out.",
                                                      "audio_out."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)  # Stage A's weights, not random ones
