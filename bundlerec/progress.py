"""Progress of long loops as log lines: done/total, rate and ETA, at most one line per ``every_s``
(and one at the end), so a `ray job logs` stream stays readable.

    p = Progress("eval bundlerec", total=len(examples), unit="baskets")
    for chunk in chunks:
        ...
        p.update(len(chunk))
    p.done()
"""

from __future__ import annotations

import time
from typing import Optional


class Progress:
    def __init__(self, what: str, total: Optional[int], unit: str = "items", every_s: float = 10.0,
                 enabled: bool = True):
        self.what, self.total, self.unit, self.every_s, self.enabled = what, total, unit, every_s, enabled
        self.n = 0
        self.t0 = self.last = time.time()

    def line(self) -> str:
        el = max(time.time() - self.t0, 1e-9)
        rate = self.n / el
        if self.total:
            eta = (self.total - self.n) / rate if rate > 0 else float("inf")
            return (f"{self.what}: {self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f} %), "
                    f"{rate:.1f} {self.unit}/s, {el:.0f} s elapsed, eta {eta:.0f} s")
        return f"{self.what}: {self.n} {self.unit}, {rate:.1f} {self.unit}/s, {el:.0f} s elapsed"

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.enabled and time.time() - self.last >= self.every_s:
            self.last = time.time()
            _emit(self.line())

    def done(self) -> None:
        if self.enabled:
            _emit(self.line().split(", eta")[0] + " (done)")


def _emit(line: str) -> None:
    """Printed, like the training loop's lines: Ray forwards a worker's stdout to the job's log,
    whatever its logging configuration."""
    print(f"[bundlerec] {line}", flush=True)


def sweep_progress_callback(num_samples: int, epochs: int):
    """A Ray Tune callback that logs the sweep's state whenever a trial starts, reports or ends (at
    most every 10 s, always on completion): trials done / running / stopped early (ASHA) / errored."""
    from ray.tune import Callback

    class SweepProgress(Callback):
        def __init__(self) -> None:
            self.t0 = time.time()
            self.last = 0.0
            self.ended: dict[str, str] = {}

        def _log(self, trials, force: bool = False) -> None:
            if not force and time.time() - self.last < 10:
                return
            self.last = time.time()
            running = sum(t.status == "RUNNING" for t in trials)
            done = sum(v == "done" for v in self.ended.values())
            pruned = sum(v == "stopped" for v in self.ended.values())
            errored = sum(t.status == "ERROR" for t in trials)
            finished = done + pruned + errored
            el = time.time() - self.t0
            eta = f", eta {el / finished * (num_samples - finished):.0f} s" if finished else ""
            _emit(f"sweep: {finished}/{num_samples} trials ended ({done} done, {pruned} stopped early, "
                  f"{errored} errored), {running} running, {el:.0f} s{eta}")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self._log(trials)

        def on_trial_complete(self, iteration, trials, trial, **info):
            # ended by ASHA before its last epoch (early stopping on patience counts as done)
            last = trial.last_result or {}
            ran_out = last.get("epoch", 0) >= epochs or last.get("early_stop")
            self.ended[trial.trial_id] = "done" if ran_out else "stopped"
            self._log(trials, force=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._log(trials, force=True)

    return SweepProgress()
