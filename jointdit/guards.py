"""Training never keeps a bad state: non-finite steps are caught where they happen, non-finite weights
are never saved, and pruning never deletes the newest good checkpoint.

- :class:`NonFiniteGuard` — ``train.nonfinite=skip|stop``. Called once per optimizer step with the
  step's loss and gradient norm (after the gradients are reduced across processes, so every rank
  decides the same). ``skip`` drops the update and counts it; ``train.max_nonfinite`` consecutive
  skips, or the first one under ``stop``, raise :class:`~jointdit.errors.NonFiniteError` naming the
  step, the values and the last good checkpoint to resume from.
- :func:`require_finite` — refuse to save or export weights holding NaN/Inf, naming the tensors.
- :func:`checkpoints_to_prune` — ``checkpoint.keep`` pruning that always spares the newest good one.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from jointdit.errors import NonFiniteError

log = logging.getLogger(__name__)

MODES = ("skip", "stop")


def _scalar(value: float | torch.Tensor | None) -> float | None:
    if value is None:
        return None
    return float(value.detach().float().item()) if torch.is_tensor(value) else float(value)


def grads_finite(parameters: Iterable[torch.nn.Parameter]) -> bool:
    """True when every gradient present is finite (one fused check, one device sync)."""
    flags = [torch.isfinite(p.grad).all() for p in parameters if p.grad is not None]
    return bool(torch.stack(flags).all()) if flags else True


def total_grad_norm(parameters: Iterable[torch.nn.Parameter]) -> float:
    """‖g‖₂ over all gradients (non-finite if any gradient is)."""
    grads = [p.grad.detach().float() for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


class NonFiniteGuard:
    """Decide, per optimizer step, whether its update may be applied.

    ``observe(step, loss, grad_norm)`` returns True for a finite step. For a non-finite one it returns
    False under ``mode="skip"`` (the caller drops the update: ``optimizer.zero_grad()`` without
    ``optimizer.step()``) and raises :class:`NonFiniteError` under ``mode="stop"`` or once
    ``max_consecutive`` steps in a row were skipped. ``last_good`` returns the newest checkpoint
    folder (or None) for the message.
    """

    def __init__(self, mode: str = "skip", max_consecutive: int = 5,
                 last_good: Callable[[], Path | None] | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"train.nonfinite={mode!r}; choose skip or stop")
        self.mode, self.max_consecutive = mode, max(1, int(max_consecutive))
        self.last_good = last_good or (lambda: None)
        self.skipped = 0        # total skipped updates in this run (resumed from the checkpoint)
        self.consecutive = 0    # skipped updates in a row, up to now

    def observe(self, step: int, loss: float | torch.Tensor | None, grad_norm: float | torch.Tensor | None) -> bool:
        loss_v, grad_v = _scalar(loss), _scalar(grad_norm)
        finite = (loss_v is None or math.isfinite(loss_v)) and (grad_v is None or math.isfinite(grad_v))
        if finite:
            self.consecutive = 0
            return True
        self.skipped += 1
        self.consecutive += 1
        what = f"non-finite {'loss' if loss_v is not None and not math.isfinite(loss_v) else 'gradients'} at step " \
               f"{step} (loss={loss_v}, grad norm={grad_v})"
        if self.mode == "stop" or self.consecutive >= self.max_consecutive:
            good = self.last_good()
            why = ("train.nonfinite=stop" if self.mode == "stop"
                   else f"{self.consecutive} consecutive steps skipped (train.max_nonfinite={self.max_consecutive})")
            where = f"last good checkpoint: {good}" if good else "no checkpoint was saved yet"
            resume = f"checkpoint.resume={good} " if good else ""
            raise NonFiniteError(
                f"{what}; stopping: {why}; {where}",
                hint=f"resume with a lower learning rate ({resume}optim.lr=<smaller>), a tighter optim.grad_clip, "
                     f"or vram.mixed_precision=no; check the data for corrupt clips")
        log.warning("%s: update skipped (%d in a row, %d in total; train.nonfinite=skip, max %d in a row)",
                    what, self.consecutive, self.skipped, self.max_consecutive)
        return False

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: Mapping[str, int] | None) -> None:
        state = state or {}
        self.skipped, self.consecutive = int(state.get("skipped", 0)), int(state.get("consecutive", 0))


def nonfinite_tensors(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating tensors that hold NaN or Inf."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    return [name for name, t in items if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all()]


def require_finite(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | torch.nn.Module,
                   what: str, step: int | None = None, last_good: Path | None = None) -> None:
    """Raise :class:`NonFiniteError` (naming the tensors) before ``what`` is written with NaN/Inf weights."""
    if isinstance(tensors, torch.nn.Module):
        tensors = tensors.state_dict()
    bad = nonfinite_tensors(tensors)
    if bad:
        at = f" at step {step}" if step is not None else ""
        good = f"; the last good checkpoint is {last_good}" if last_good else ""
        raise NonFiniteError(
            f"refusing to write {what}{at}: {len(bad)} tensor(s) hold NaN/Inf ({', '.join(bad[:5])}"
            f"{', ...' if len(bad) > 5 else ''}){good}",
            hint="nothing was overwritten; resume from the last good checkpoint with a lower optim.lr or "
                 "train.nonfinite=skip")


def checkpoints_to_prune(checkpoints: list[Path], keep: int, is_good: Callable[[Path], bool] | None = None) -> list[Path]:
    """Which of ``checkpoints`` (oldest first) to delete so ``keep`` remain; ``keep <= 0`` keeps all.

    The newest checkpoint for which ``is_good`` holds is never in the list, even when newer
    (unusable) ones fill the ``keep`` slots — a run always keeps something to resume from.
    """
    if keep <= 0 or len(checkpoints) <= keep:
        return []
    doomed = list(checkpoints[:-keep])
    is_good = is_good or (lambda path: True)
    kept = checkpoints[-keep:]
    if not any(is_good(path) for path in reversed(kept)):
        newest_good = next((path for path in reversed(doomed) if is_good(path)), None)
        if newest_good is not None:
            doomed.remove(newest_good)
    return doomed


def checkpoint_is_good(path: Path) -> bool:
    """A complete, loadable checkpoint: trainer state with a step, a readable ``model.safetensors``
    header, no unsafe pickle (weights are checked finite before they are saved: :func:`require_finite`)."""
    from jointdit.errors import CheckpointError
    from jointdit.safeload import verify_checkpoint_folder

    try:
        state = verify_checkpoint_folder(path)
    except CheckpointError:
        return False
    return state.get("finite", True) is not False


def update_allowed(run, loss: torch.Tensor | float) -> bool:
    """At an optimizer step: may its update be applied? (``run.guard`` decides; see :class:`NonFiniteGuard`.)

    The decision uses the gradient norm, which is the same on every rank once DDP has reduced the
    gradients, so all processes skip or stop together. Under fp16 the GradScaler already skips
    overflowing gradients (routine while it finds its scale), so only the loss is judged there.
    """
    guard = getattr(run, "guard", None)
    if guard is None:
        return True
    scaler = getattr(run.accelerator, "scaler", None)
    grad_norm = None
    if scaler is None:
        grad_norm = run.grad_norm if float(run.cfg.optim.grad_clip) > 0 else total_grad_norm(run.model.parameters())
    allowed = guard.observe(run.step + 1, loss, grad_norm)
    if not allowed:
        run.tracker.log_metrics({"nonfinite_skipped": guard.skipped}, run.step + 1)
    return allowed


def drop_update(accelerator, optimizer) -> None:
    """Skip this optimizer step: no weight and no optimizer state changes (the LR schedule still advances)."""
    optimizer.zero_grad(set_to_none=True)
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None:  # what the scaler does itself on an overflow: back off, forget this step's unscale
        scaler.update(new_scale=scaler.get_scale() * scaler.get_backoff_factor())


def newest_checkpoint(root: Path) -> Path | None:
    from jointdit.checkpoints import list_checkpoints

    found = list_checkpoints(Path(root))
    return found[-1] if found else None
