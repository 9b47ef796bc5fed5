
import av
import numpy as np
import pytest
import torch

from jointdit.data.media import (MediaError, probe_duration, probe_video, read_clip, read_image, read_wav, write_mp4,
                                 write_png, write_wav)

FPS, SR, SIZE = 8, 16000, 32


def _clip(seconds: float = 2.0):
    t = int(seconds * FPS)
    frames = torch.linspace(-1, 1, t)[:, None, None, None].expand(t, 3, SIZE, SIZE).clone()
    frames[:, 0, : SIZE // 2] = -frames[:, 0, : SIZE // 2]  # some structure per channel
    wave = 0.5 * torch.sin(torch.arange(int(seconds * SR)) * 2 * np.pi * 440 / SR)
    return frames, wave


def _read(path, **kw):
    return read_clip(path, **{"fps": FPS, "size": SIZE, "seconds": 2.0, "sample_rate": SR, **kw})


def test_mp4_round_trip_keeps_frames_size_fps_and_audio(tmp_path):
    frames, wave = _clip()
    path = write_mp4(tmp_path / "clip.mp4", frames, FPS, wave, SR)
    with av.open(str(path)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert (video.width, video.height) == (SIZE, SIZE)
        assert float(video.average_rate) == FPS
        assert video.codec_context.name == "h264" and audio.codec_context.name == "aac"
        assert sum(1 for _ in container.decode(video=0)) == frames.shape[0]
    clip = _read(path)
    assert clip.frames.shape == frames.shape
    assert (clip.frames - frames).abs().mean() < 0.03  # H.264 at crf 18 is near-lossless here
    assert abs(clip.wave.shape[0] / SR - wave.shape[0] / SR) <= 0.010
    assert abs(probe_duration(path) - 2.0) <= 1 / FPS
    # Audio stays aligned: correlation with the source is high at zero lag.
    corr = np.corrcoef(clip.wave.numpy(), wave.numpy())[0, 1]
    assert corr > 0.95


def test_read_resamples_fps_and_crops_centre(tmp_path):
    frames = torch.zeros(16, 3, 48, 64) - 1
    frames[:, :, :, 24:40] = 1  # a bright centre band 16 px wide
    path = write_mp4(tmp_path / "wide.mp4", frames, 8, torch.zeros(32000), SR)
    clip = read_clip(path, fps=4, size=24, seconds=2.0, sample_rate=8000)
    assert clip.frames.shape == (8, 3, 24, 24)  # 4 fps x 2 s, scaled to 24 high then centre-cropped
    assert clip.wave.shape == (16000,)
    centre, edge = clip.frames[:, :, :, 10:14].mean(), clip.frames[:, :, :, :2].mean()
    assert centre > 0.8 and edge < -0.8


def test_wav_round_trip(tmp_path):
    _, wave = _clip()
    path = write_wav(tmp_path / "a.wav", wave, SR)
    back, rate = read_wav(path)
    assert rate == SR and back.shape == wave.shape
    assert (back - wave).abs().max() < 1e-3
    resampled, rate = read_wav(path, sample_rate=8000)
    assert rate == 8000 and abs(resampled.shape[0] - 16000) <= 1


def test_missing_file(tmp_path):
    with pytest.raises(MediaError, match="nope.mp4: no such file"):
        _read(tmp_path / "nope.mp4")


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.mp4").touch()
    with pytest.raises(MediaError, match=r"empty.mp4: file is empty \(0 bytes\)"):
        _read(tmp_path / "empty.mp4")


def test_truncated_file(tmp_path):
    frames, wave = _clip()
    data = write_mp4(tmp_path / "good.mp4", frames, FPS, wave, SR).read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match="cut.mp4: .*truncated or corrupt"):
        _read(tmp_path / "cut.mp4")


def test_no_video_stream(tmp_path):
    path = tmp_path / "audio_only.mp4"
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=SR)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="flt", layout="mono")
        frame.sample_rate = SR
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    with pytest.raises(MediaError, match="audio_only.mp4: no video stream"):
        _read(path)


def test_no_audio_stream_is_an_error_unless_allowed(tmp_path):
    frames, _ = _clip()
    path = write_mp4(tmp_path / "silent.mp4", frames, FPS)
    with pytest.raises(MediaError, match="silent.mp4: no audio stream"):
        _read(path)
    clip = _read(path, allow_missing_audio=True)
    assert not clip.has_audio and clip.wave.shape == (2 * SR,) and clip.wave.abs().max() == 0


def test_clip_shorter_than_requested(tmp_path):
    frames, wave = _clip(seconds=1.0)
    path = write_mp4(tmp_path / "short.mp4", frames, FPS, wave, SR)
    with pytest.raises(MediaError, match=r"short.mp4: clip is shorter than requested: video covers 1.000 s"):
        _read(path, seconds=2.0)
    assert _read(path, seconds=1.0).frames.shape[0] == FPS


def test_audio_shorter_than_video_is_reported(tmp_path):
    frames, wave = _clip()
    path = write_mp4(tmp_path / "half_audio.mp4", frames, FPS, wave[: SR], SR)
    with pytest.raises(MediaError, match="half_audio.mp4: clip is shorter than requested: audio covers"):
        _read(path)


def test_write_is_atomic_on_failure(tmp_path):
    with pytest.raises(ValueError, match="even frame sizes"):
        write_mp4(tmp_path / "odd.mp4", torch.zeros(4, 3, 33, 33), FPS)
    assert list(tmp_path.iterdir()) == []  # no half-written file, no temp left behind


def test_a_failing_write_keeps_the_earlier_file_and_leaves_no_temp(tmp_path):
    frames, wave = _clip(1.0)
    path = write_mp4(tmp_path / "clip.mp4", frames, FPS, wave, SR)
    before = path.read_bytes()
    with pytest.raises(MediaError, match=r"clip.mp4: cannot be encoded as H.264 \+ AAC"):  # AAC refuses 1 Hz mid-write
        write_mp4(path, frames, FPS, wave, sample_rate=1)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


def test_written_files_get_the_umask_permissions(tmp_path):
    import os

    old = os.umask(0o027)
    try:
        files = [write_wav(tmp_path / "a.wav", torch.zeros(160), SR), write_mp4(tmp_path / "a.mp4", torch.zeros(2, 3, 16, 16), FPS),
                 write_png(tmp_path / "a.png", torch.zeros(3, 16, 16))]
    finally:
        os.umask(old)
    assert all((p.stat().st_mode & 0o777) == 0o640 for p in files)


def test_png_and_probe_round_trip(tmp_path):
    from PIL import Image

    image = torch.linspace(-1, 1, 3 * 8 * 12).reshape(3, 8, 12)
    path = write_png(tmp_path / "frame.png", image)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (12, 8) and im.mode == "RGB"
        raw = torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1
    assert (raw - image).abs().max() <= 1 / 127.5
    torch.testing.assert_close(read_image(path), raw)
    frames, wave = _clip(2.0)
    fps, size, seconds = probe_video(write_mp4(tmp_path / "c.mp4", frames[:, :, :, :24], FPS, wave, SR))
    assert fps == FPS and size == (SIZE, 24) and seconds == pytest.approx(2.0)
    with pytest.raises(MediaError, match="no such file"):
        probe_video(tmp_path / "none.mp4")
