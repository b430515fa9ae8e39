"""How training ends other than by finishing: importable without torch, so the command line can report them."""

import signal
from pathlib import Path


class Stopped(Exception):
    """Training stopped on SIGTERM or SIGINT after writing a checkpoint; rerunning the same command resumes."""

    def __init__(self, signum: int, step: int, checkpoint_dir: Path | None):
        self.signum, self.step, self.checkpoint_dir = signum, step, checkpoint_dir
        super().__init__(
            f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint {checkpoint_dir}; "
            "run the same command again to resume"
        )


class Diverged(RuntimeError):
    """The weights became non-finite or exploded: training stops, nothing after the last checkpoint is saved."""
