"""Pretrained codec weights: mirror them from the Hugging Face Hub, or check hand-placed folders.

    python -m jointdit.assets fetch [--dest assets/models] [--only svd|audioldm2]
    python -m jointdit.assets check [--dest assets/models]

``fetch`` downloads only the files the codecs load:

==========================  ==================================================  =====================================
local folder                repository (subfolder)                              files
==========================  ==================================================  =====================================
<dest>/svd/vae              stabilityai/stable-video-diffusion-img2vid (vae)    config.json, diffusion_pytorch_model.safetensors
<dest>/audioldm2/vae        cvssp/audioldm2 (vae)                               config.json, diffusion_pytorch_model.safetensors
<dest>/audioldm2/vocoder    cvssp/audioldm2 (vocoder)                           config.json, model.safetensors
==========================  ==================================================  =====================================

The SVD repository is gated: accept its licence on the Hub and export ``HF_TOKEN`` first.
Without a reachable hub (``HF_HUB_OFFLINE=1``, no DNS, no route) ``fetch`` fails within seconds and
says how to place the folders by hand. The exit status is 0 on success, 2 when nothing could be
fetched or checked.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Asset:
    key: str
    repo_id: str
    subfolder: str
    local: str  # relative to dest
    files: tuple[str, ...]
    model_class: str
    model_type: str | None = None


ASSETS: tuple[Asset, ...] = (
    Asset("svd", "stabilityai/stable-video-diffusion-img2vid", "vae", "svd/vae",
          ("config.json", "diffusion_pytorch_model.safetensors"), "AutoencoderKLTemporalDecoder"),
    Asset("audioldm2", "cvssp/audioldm2", "vae", "audioldm2/vae",
          ("config.json", "diffusion_pytorch_model.safetensors"), "AutoencoderKL"),
    Asset("audioldm2", "cvssp/audioldm2", "vocoder", "audioldm2/vocoder",
          ("config.json", "model.safetensors"), "SpeechT5HifiGan", "speecht5_hifigan"),
)

DEFAULT_DEST = Path("assets/models")


class HubUnreachable(RuntimeError):
    pass


def manual_instructions(dest: Path, assets=ASSETS) -> str:
    lines = ["To install the pretrained codecs by hand, place these folders (diffusers/transformers format):"]
    for a in assets:
        lines.append(f"  {dest / a.local}/  <-  {a.repo_id} : {a.subfolder}/{{{', '.join(a.files)}}}")
    lines.append("e.g. on a machine with hub access (the SVD repository is gated: accept its licence, set HF_TOKEN):")
    for repo in dict.fromkeys(a.repo_id for a in assets):
        mine = [a for a in assets if a.repo_id == repo]
        files = " ".join(f"{a.subfolder}/{f}" for a in mine for f in a.files)
        lines.append(f"  hf download {repo} {files} --local-dir {dest / Path(mine[0].local).parent}")
    lines.append("then copy the folders over (or run `python -m jointdit.assets check` to verify them).")
    lines.append("or point the codec config elsewhere: codec=svd_audioldm2 codec.video.vae_path=... "
                 "codec.audio.vae_path=... codec.audio.vocoder_path=...")
    lines.append("The embedded default codec=pixel_mel needs no weights at all.")
    return "\n".join(lines)


def _endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _offline_env() -> str | None:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return var
    return None


def probe_hub(repo_id: str, timeout: float = 5.0) -> None:
    """Raise :class:`HubUnreachable` unless the hub answers within ``timeout`` seconds.

    Any HTTP answer (even 401/403 for a gated repo) counts as reachable; DNS failures, refused or
    timed-out connections do not.
    """
    var = _offline_env()
    if var:
        raise HubUnreachable(f"{var} is set, so the hub is not contacted")
    url = f"{_endpoint()}/api/models/{repo_id}"
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise HubUnreachable(f"cannot reach {_endpoint()} ({reason})") from e


def check(dest: Path, assets=ASSETS) -> list[tuple[Asset, str | None]]:
    """``[(asset, None | error message)]`` for the expected folders under ``dest``."""
    from jointdit.codecs.base import find_model_folder

    out = []
    for a in assets:
        try:
            find_model_folder(dest / a.local, a.subfolder, a.files, a.model_class, f"{a.repo_id}/{a.subfolder}",
                              expected_model_type=a.model_type)
            out.append((a, None))
        except (FileNotFoundError, ValueError) as e:
            out.append((a, str(e).split(". ")[0]))
    return out


def fetch(dest: Path, only: str | None = None, timeout: float = 5.0, token: str | None = None) -> list[Path]:
    """Mirror the selected assets into ``dest``; raises :class:`HubUnreachable` fast when offline."""
    assets = [a for a in ASSETS if only in (None, a.key)]
    for repo in dict.fromkeys(a.repo_id for a in assets):
        probe_hub(repo, timeout=timeout)
    from huggingface_hub import snapshot_download

    done = []
    for repo in dict.fromkeys(a.repo_id for a in assets):
        mine = [a for a in assets if a.repo_id == repo]
        local_root = dest / Path(mine[0].local).parent  # <dest>/svd or <dest>/audioldm2
        patterns = [f"{a.subfolder}/{f}" for a in mine for f in a.files]
        print(f"fetching {repo}: {', '.join(patterns)} -> {local_root}", flush=True)
        snapshot_download(repo, allow_patterns=patterns, local_dir=str(local_root), token=token,
                          etag_timeout=timeout)
        done += [dest / a.local for a in mine]
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jointdit.assets", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download the pretrained codec folders")
    f.add_argument("--dest", type=Path, default=DEFAULT_DEST)
    f.add_argument("--only", choices=sorted({a.key for a in ASSETS}))
    f.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the hub before giving up")
    c = sub.add_parser("check", help="verify hand-placed folders")
    c.add_argument("--dest", type=Path, default=DEFAULT_DEST)
    args = ap.parse_args(argv)

    if args.cmd == "check":
        ok = True
        for a, err in check(args.dest):
            print(f"{'ok     ' if err is None else 'MISSING'} {args.dest / a.local}" + ("" if err is None else f"  ({err})"))
            ok &= err is None
        if not ok:
            print("\n" + manual_instructions(args.dest), file=sys.stderr)
        return 0 if ok else 2

    selected = [a for a in ASSETS if args.only in (None, a.key)]
    try:
        paths = fetch(args.dest, args.only, args.timeout)
    except HubUnreachable as e:
        print(f"jointdit.assets fetch: the model hub is unreachable: {e}.\n\n{manual_instructions(args.dest, selected)}",
              file=sys.stderr)
        return 2
    except Exception as e:  # gated repo without token, HTTP errors, disk full, ...
        hint = ""
        name = type(e).__name__
        if "Gated" in name or "401" in str(e) or "403" in str(e):
            hint = ("\nThe SVD repository is gated: accept its licence on the Hub and export HF_TOKEN=<your token>.")
        print(f"jointdit.assets fetch failed: {name}: {e}{hint}\n\n{manual_instructions(args.dest, selected)}", file=sys.stderr)
        return 2
    for p in paths:
        print(f"ok {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
