"""The training steps on the terminal: one live bar instead of transformers' bar and printed log dicts."""

from __future__ import annotations

import logging

from transformers import TrainerCallback

from spa.run.console import progress_bar

log = logging.getLogger("spa.training.trainer")  # the step lines go under the trainer's name in the run's log


class TrainProgress(TrainerCallback):
    """The training steps as one live bar with the latest loss and learning rate; every log dict into the
    run's log (``spa.training.trainer`` logger), none printed."""

    def __init__(self):
        self.bar, self.shown = None, {}

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = progress_bar(state.max_steps, "train", "step")
            self.bar.update(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        log.info("step %d: %s", state.global_step, logs)
        self.shown.update({k: f"{logs[k]:.3g}" for k in ("loss", "learning_rate") if isinstance(logs.get(k), int | float)})
        if self.bar is not None and self.shown:
            self.bar.set_postfix(self.shown, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
