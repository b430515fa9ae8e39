"""Progress of a long loop: a bar on a terminal, plain periodic log lines anywhere else (worker logs, files),
where a bar's carriage returns would pile up into one unreadable line."""

from __future__ import annotations

import logging
import sys


class Progress:
    def __init__(self, total: int, desc: str, logger: logging.Logger, initial: int = 0, enabled: bool = True):
        self.total, self.desc, self.log, self.n = total, desc, logger, initial
        self.every = max(1, total // 20)
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
        self.enabled = enabled

    def update(self, n: int, **shown: object) -> None:
        """Advance to n done; `shown` values go on the bar, or on the periodic line."""
        self.n = n
        if self.bar is not None:
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(n - self.bar.n)
        elif self.enabled and (n % self.every == 0 or n == self.total):
            extra = " ".join(f"{k} {v}" for k, v in shown.items())
            self.log.info("%s %d/%d %s", self.desc, n, self.total, extra)

    def close(self, why: str = "") -> None:
        """End the bar; `why` says why it stopped short of the total, when it did."""
        if self.bar is not None:
            if why:
                self.bar.set_description(f"{self.desc} (stopped: {why})")
            self.bar.close()
        elif self.enabled and why:
            self.log.info("%s stopped at %d/%d: %s", self.desc, self.n, self.total, why)
