"""MP4 frame I/O: PyAV directly (jointdit.data.media) vs imageio's PyAV plugin — time and capability.

    python experiments/bench_media.py                 # writes experiments/results/bench_media.md
    python experiments/bench_media.py --size 256 --frames 96 --repeats 7

For each clip size it times (median of ``--repeats``, after one warm-up):
- write a video-only H.264 MP4 (yuv420p, crf 18): ``media.write_mp4`` vs ``imageio.v3.imwrite(plugin="pyav")``;
- read every frame back as RGB: ``media.read_clip`` (frames placed by presentation time, resized to the
  clip size) vs ``imageio.v3.imread(plugin="pyav")`` (all frames, no timing);
and it checks what each can do with a sounding clip (an AAC track beside the video).
imageio is needed only to run this script (``pip install imageio``); the project itself does not use it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jointdit.data.media import read_clip, write_mp4  # noqa: E402

FPS, SR = 24, 16000


def _clip(size: int, frames: int) -> torch.Tensor:
    """A moving gradient with a square: [T, 3, H, W] in [-1, 1]."""
    t = torch.arange(frames)[:, None, None, None].float()
    y = torch.linspace(-1, 1, size)[None, None, :, None]
    x = torch.linspace(-1, 1, size)[None, None, None, :]
    c = torch.arange(3)[None, :, None, None].float()
    video = torch.sin(3 * x + 0.2 * t + c) * torch.cos(2 * y - 0.1 * t)
    return video.clamp(-1, 1)


def _time(fn, repeats: int) -> tuple[float, float]:
    """Median (wall seconds, CPU seconds of this process, all threads) over ``repeats`` calls."""
    fn()  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def bench(size: int, frames: int, repeats: int, folder: Path) -> dict:
    import imageio.v3 as iio

    video = _clip(size, frames)
    pictures = video.add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # [T, H, W, 3]
    ours, theirs = folder / f"pyav_{size}.mp4", folder / f"imageio_{size}.mp4"
    seconds = frames / FPS

    out = {
        "write_pyav": _time(lambda: write_mp4(ours, video, FPS), repeats),
        "write_imageio": _time(lambda: iio.imwrite(theirs, pictures, plugin="pyav", codec="h264", fps=FPS,
                                                   out_pixel_format="yuv420p"), repeats),
        "read_pyav": _time(lambda: read_clip(ours, fps=FPS, size=size, seconds=seconds, sample_rate=SR,
                                             allow_missing_audio=True), repeats),
        "read_imageio": _time(lambda: iio.imread(ours, plugin="pyav"), repeats),
    }
    a = read_clip(ours, fps=FPS, size=size, seconds=seconds, sample_rate=SR, allow_missing_audio=True).frames
    b = torch.from_numpy(iio.imread(ours, plugin="pyav")).permute(0, 3, 1, 2).float() / 127.5 - 1
    out["same_frames"] = float(torch.equal(a, b))
    return out


def capabilities(folder: Path) -> dict[str, str]:
    """Can each write and read a sounding MP4 (H.264 + AAC)?"""
    import imageio.v3 as iio

    video, wave = _clip(32, 24), 0.3 * torch.sin(torch.arange(SR) * 2 * np.pi * 440 / SR)
    path = write_mp4(folder / "sound.mp4", video, FPS, wave, SR)
    clip = read_clip(path, fps=FPS, size=32, seconds=1.0, sample_rate=SR)
    caps = {"pyav (media.py)": f"writes H.264+AAC, reads {clip.wave.shape[0]} audio samples + frames by timestamp"}
    import inspect

    from imageio.plugins.pyav import PyAVPlugin

    audio_args = [p for p in inspect.signature(PyAVPlugin.write).parameters if "audio" in p]
    props = iio.improps(path, plugin="pyav")
    caps["imageio pyav plugin"] = (f"write() audio arguments: {audio_args or 'none'}; reads video only "
                                   f"(improps shape {tuple(props.shape)}, no audio API)")
    return caps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_media.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [(size, bench(size, args.frames, args.repeats, Path(tmp))) for size in args.sizes]
        caps = capabilities(Path(tmp))
    lines = [f"# MP4 frame I/O: PyAV directly vs imageio's PyAV plugin ({args.frames} frames at {FPS} fps, "
             f"median of {args.repeats})", "",
             f"`python experiments/bench_media.py --sizes {' '.join(map(str, args.sizes))} --frames {args.frames} "
             f"--repeats {args.repeats}`", "",
             "Each cell: wall ms / CPU ms (this process, all threads).", "",
             "| size | write: PyAV | write: imageio | read: PyAV | read: imageio | same frames read |",
             "| --- | --- | --- | --- | --- | --- |"]

    def cell(t: tuple[float, float]) -> str:
        return f"{1e3 * t[0]:.0f} / {1e3 * t[1]:.0f}"

    for size, r in rows:
        lines.append(f"| {size}x{size} | {cell(r['write_pyav'])} | {cell(r['write_imageio'])} | {cell(r['read_pyav'])} | "
                     f"{cell(r['read_imageio'])} | {'yes' if r['same_frames'] else 'no'} |")
    lines += ["", "| library | sounding MP4 (H.264 + AAC) |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in caps.items()]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
