"""The ``jointdit`` error family, and ``run_cli`` — how the command-line entry points report them.

A :class:`JointditError` is a failure the user can fix (a bad config value, a missing folder, a corrupt
checkpoint, a full disk). It carries one message that names the file, key or step, and a ``hint``
saying how to fix it. ``run_cli`` prints it as::

    error: batch_size=6 is not a multiple of vram.micro_batch_size (4) x 1 process(es) = 4
      hint: use batch_size=4 or batch_size=8, or set vram.micro_batch_size to a divisor of 6

with no traceback, and exits with the error's ``exit_code``: 2 for bad input, 1 for a failure that is
not the input's fault (disk full, non-finite training). ``HYDRA_FULL_ERROR=1`` re-raises instead, so
the full traceback is still there for whoever needs it. Any other exception is a bug and propagates
unchanged (Hydra prints it, exit code 1).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, TypeVar

T = TypeVar("T")

BAD_INPUT = 2
FAILURE = 1


class JointditError(Exception):
    """A failure with one clear message plus a hint; ``exit_code`` 2 = bad input, 1 = runtime failure."""

    exit_code: int = BAD_INPUT

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class ConfigError(JointditError, ValueError):
    """A config value that is missing, of the wrong type, out of range or inconsistent with another."""


class DataError(JointditError, ValueError):
    """Input data that cannot be used: a missing folder, a list entry outside ``data.root``, a bad file."""


class CheckpointError(JointditError, ValueError):
    """A checkpoint or model folder that is incomplete, corrupt, unsafe, or does not fit this model."""


class CacheCorruptError(DataError):
    """A latent-cache shard that is missing, truncated or does not match its checksum in the index."""


class InitFromError(ConfigError):
    """``stage.init_from`` names nothing usable (or ``auto`` found no Stage A export)."""


class InitFromMissingError(InitFromError, FileNotFoundError):
    """``stage.init_from`` names no folder and no MLflow run."""


class LockError(JointditError, RuntimeError):
    """Another live process is writing to the same output folder."""


class WriteError(JointditError, OSError):
    """A write that failed (disk full, permissions); nothing half-written was left behind."""

    exit_code = FAILURE


class NonFiniteError(JointditError, FloatingPointError):
    """Training produced non-finite losses or gradients (``train.nonfinite=stop`` or too many skips)."""

    exit_code = FAILURE


# Errors raised by other project modules that are user-fixable but predate this family. Named here
# (module, class) so this module imports nothing heavy; each prints as one message with exit code 2.
_KNOWN_USER_ERRORS = (
    ("jointdit.data.media", "MediaError"),
    ("jointdit.data.cache", "CacheError"),
    ("jointdit.data.cache", "CacheMissingError"),
    ("jointdit.data.dataset", "CacheMissingError"),
    ("jointdit.memory", "MemoryPlanError"),
    ("jointdit.assets", "HubUnreachable"),
)


def _user_error_types() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = [JointditError]
    for module, name in _KNOWN_USER_ERRORS:
        mod = sys.modules.get(module)  # only modules already imported can have raised it
        cls = getattr(mod, name, None) if mod is not None else None
        if isinstance(cls, type):
            found.append(cls)
    try:
        from omegaconf.errors import OmegaConfBaseException

        found.append(OmegaConfBaseException)  # a missing ??? value, a wrong type, an unknown key
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return tuple(found)


def user_message(err: BaseException) -> str:
    """One message for a user-fixable error (OmegaConf's multi-line reports are reduced to their point)."""
    if isinstance(err, JointditError):
        return str(err)
    try:
        from omegaconf.errors import OmegaConfBaseException
    except ImportError:  # pragma: no cover
        OmegaConfBaseException = ()  # type: ignore[assignment]
    if isinstance(err, OmegaConfBaseException):
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        key = getattr(err, "full_key", None)
        where = f" (key {key})" if key and key not in first else ""
        return f"config: {first}{where}\n  hint: fix it on the command line (key=value) or in conf/"
    return str(err)


def exit_code_of(err: BaseException) -> int:
    return int(getattr(err, "exit_code", BAD_INPUT))


def run_cli(fn: Callable[[], T]) -> T:
    """Call ``fn()``; a user-fixable error becomes ``error: <message>`` on stderr and ``SystemExit(code)``.

    Use it inside a ``@hydra.main`` function: ``return run_cli(lambda: train(cfg))``. With
    ``HYDRA_FULL_ERROR=1`` the error is re-raised so Hydra prints the complete traceback.
    """
    try:
        return fn()
    except _user_error_types() as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        sys.stdout.flush()
        print(f"error: {user_message(err)}", file=sys.stderr, flush=True)
        raise SystemExit(exit_code_of(err)) from None


def describe(value: Any) -> str:
    """``repr`` for strings, ``str`` otherwise — how a value is quoted in messages."""
    return repr(value) if isinstance(value, str) else str(value)
