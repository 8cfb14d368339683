"""Trainer callbacks: code that runs at fixed points of training without changing the Trainer.

A callback is any object with some of these methods (all optional; `Callback` is a base class with
each of them doing nothing, for convenience):

  on_train_begin(trainer)                 fit() starts (after a resume has restored the run's state)
  on_step_end(trainer, step_info)         an optimizer step is done (StepInfo below)
  on_epoch_end(trainer, epoch_metrics)    an epoch is measured, before its line, checkpoint and
                                          metrics.jsonl record: add keys to the dict to report more
                                          (JSON values; the Trainer's own keys may not change)
  on_train_end(trainer, summary)          fit() is about to return `summary`

and, for a callback with state that resume must restore exactly, both of

  state_dict() -> dict                    saved in every checkpoint (weights_only-loadable values)
  load_state_dict(state)                  given it back on resume, before on_train_begin
  state_key                               (attribute, optional) the name of that state in the
                                          checkpoint; default: the class name. Unique per Trainer.

Callbacks run on every rank, in list order, at the same points, so one may use collectives (every rank
calls them). Each rank saves its own state_dict. A callback that draws random numbers must use its own
torch.Generator (and save it): the training streams are part of the run's exactness.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List

HOOKS = ("on_train_begin", "on_step_end", "on_epoch_end", "on_train_end")


@dataclass(frozen=True)
class StepInfo:
    """What on_step_end receives about the step just done."""

    epoch: int            # 1-based epoch the step belongs to
    step: int             # optimizer steps done in the run (this one included)
    step_in_epoch: int    # optimizer steps done in this epoch (this one included)
    steps_per_epoch: int
    loss: float           # this rank's mean loss over the step's micro-batches
    lr: float             # the learning rate the step used
    samples: int          # samples this rank used in the step


class Callback:
    """Optional base class: every hook does nothing (override the ones needed)."""

    def on_train_begin(self, trainer) -> None:
        pass

    def on_step_end(self, trainer, step_info: StepInfo) -> None:
        pass

    def on_epoch_end(self, trainer, epoch_metrics: Dict[str, Any]) -> None:
        pass

    def on_train_end(self, trainer, summary: Dict[str, Any]) -> None:
        pass


def _name(cb: Any) -> str:
    return type(cb).__name__


class Callbacks:
    """The Trainer's callback list: checks it once, calls the hooks, saves and restores the state."""

    def __init__(self, callbacks: Iterable[Any]) -> None:
        if isinstance(callbacks, (str, bytes)) or not hasattr(callbacks, "__iter__"):
            raise TypeError(f"Trainer: callbacks must be a list of callback objects, got {callbacks!r}")
        self.items: List[Any] = list(callbacks)
        self.stateful: Dict[str, Any] = {}
        for cb in self.items:
            if isinstance(cb, type):
                raise TypeError(f"Trainer: callbacks takes instances, got the class {cb.__name__} (write "
                                f"{cb.__name__}())")
            has_state = hasattr(cb, "state_dict") or hasattr(cb, "load_state_dict")
            if not has_state and not any(hasattr(cb, h) for h in HOOKS):
                raise TypeError(f"Trainer: callback {_name(cb)} has none of {', '.join(HOOKS)}, state_dict")
            if not has_state:
                continue
            if not (callable(getattr(cb, "state_dict", None)) and callable(getattr(cb, "load_state_dict", None))):
                raise TypeError(f"Trainer: callback {_name(cb)} needs both state_dict() and load_state_dict()")
            key = getattr(cb, "state_key", None) or _name(cb)
            if key in self.stateful:
                raise ValueError(f"Trainer: two callbacks save their state as {key!r}: give them distinct "
                                 f"state_key attributes")
            self.stateful[key] = cb

    def call(self, hook: str, trainer, *args) -> None:
        for cb in self.items:
            fn = getattr(cb, hook, None)
            if fn is not None:
                fn(trainer, *args)

    def epoch_end(self, trainer, rec: Dict[str, Any]) -> None:
        """on_epoch_end of each callback; each may add keys to `rec` (JSON values), not change any."""
        for cb in self.items:
            fn = getattr(cb, "on_epoch_end", None)
            if fn is None:
                continue
            before = dict(rec)
            fn(trainer, rec)
            changed = [k for k in before if k not in rec or (rec[k] is not before[k] and rec[k] != before[k])]
            if changed:
                raise ValueError(f"Trainer: callback {_name(cb)} changed the epoch metrics {', '.join(changed)}; "
                                 f"a callback may add keys, not change or remove them")
            for k in rec.keys() - before.keys():
                try:
                    json.dumps(rec[k])
                except (TypeError, ValueError):
                    raise TypeError(f"Trainer: callback {_name(cb)} added epoch metric {k!r} = {rec[k]!r}, which "
                                    f"is not a JSON value (a number, string, bool, None, list or dict)") from None

    def state_dict(self) -> Dict[str, Any]:
        return {key: cb.state_dict() for key, cb in self.stateful.items()}

    def load_state_dict(self, states: Dict[str, Any]) -> None:
        for key, cb in self.stateful.items():
            cb.load_state_dict(states[key])
