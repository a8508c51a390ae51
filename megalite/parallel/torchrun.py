"""launch.sh's torchrun: the stock launcher (torch.distributed.run), with megalite's rules
for signals and exit status.

Stock torchrun traps SIGINT/SIGTERM/SIGHUP/SIGQUIT by raising SignalException: it
forwards the signal to its workers, waits for them (30 s, then SIGKILL) and exits
non-zero with a traceback, even when the workers stopped cleanly and saved. Run as
`python -m megalite.parallel.torchrun ARGS` (torchrun's own arguments) it instead:

- counts every stop signal within MEGALITE_STOP_WINDOW_S of the first as that one
  request (copies arrive from the terminal, `timeout`, launch.sh and Slurm at once):
  the first is forwarded to the workers as torchrun does, the copies are ignored;
  one after the window ends torchrun at once (its workers die with it: PDEATHSIG);
- does not restart the workers (run.max_restarts, torchrun's --max_restarts) when every
  failed worker exited with a user error (exit 2: a config or data mistake, which a
  restart would only repeat); other failures restart as torchrun does;
- ignores SIGUSR1, whose default action would kill it; the workers inherit it ignored
  and install their own "save after this step" handler (training/signals.py);
- exits 0 when rank 0 recorded a finished run or a clean stop in
  MEGALITE_OUTCOME_FILE (written after the last checkpoint's commit), whatever
  torchrun's own status after the signals, and without a traceback;
- otherwise, when workers failed, prints one paragraph: which ranks, their exit codes,
  and the end of each failed rank's log under MEGALITE_RUN_DIR (rank 0's console
  already showed its own), then exits 2 when every failure was a user error (the
  workers' exit 2; the workers torchrun itself then stopped with SIGTERM do not count)
  and 1 for a crash.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch.distributed.elastic.agent.server.local_elastic_agent as elastic_agent
import torch.distributed.elastic.multiprocessing.api as elastic_api
import torch.distributed.elastic.multiprocessing.errors as elastic_errors
import torch.distributed.run as torch_run

USER_ERROR = 2
LOG_LINES = 6


def _one_request_per_window(window_s: float) -> None:
    """Replace torchrun's stop handler (looked up when it starts its workers) with one
    that lets the copies of a stop request through unanswered."""
    raise_stop = elastic_api._terminate_process_handler
    first = []

    def handler(signum, frame):
        now = time.monotonic()
        if first and now - first[0] < window_s:
            return  # the same request: the workers have it already
        first.append(now)
        raise_stop(signum, frame)

    elastic_api._terminate_process_handler = handler


def _causes(failures: dict) -> dict:
    """The failures that caused the run to fail: torchrun stops the other workers with
    SIGTERM once one failed, and those are not causes (unless nothing else failed)."""
    return {rank: f for rank, f in failures.items() if f.exitcode != -signal.SIGTERM} or \
        failures


def _user_errors_only(failures: dict) -> bool:
    return all(f.exitcode == USER_ERROR for f in _causes(failures).values())


def _no_restart_after_user_errors() -> None:
    """Wrap the agent's check of its workers: a failure of user errors only leaves it no
    restarts, so it stops the run as after the last one."""
    agent = elastic_agent.LocalElasticAgent
    monitor = agent._monitor_workers

    def watched(self, worker_group):
        result = monitor(self, worker_group)
        if result.is_failed() and result.failures and _user_errors_only(result.failures):
            self._remaining_restarts = 0
        return result

    agent._monitor_workers = watched


def _outcome() -> dict | None:
    path = os.environ.get("MEGALITE_OUTCOME_FILE")
    if not path or not Path(path).is_file():
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _log_tail(rank: int) -> str:
    run_dir = os.environ.get("MEGALITE_RUN_DIR")
    if not run_dir:
        return ""
    log = Path(run_dir) / "logs" / f"rank_{rank:05d}.log"
    try:
        lines = log.read_text(errors="replace").splitlines()[-LOG_LINES:]
    except OSError:
        return f" (no log at {log})"
    return f"; the end of {log}:\n    " + "\n    ".join(lines)


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def report_failure(error) -> int:
    failures = sorted(error.failures.items())
    causes = _causes(error.failures)
    lines = [f"[megalite] the run failed: rank {rank} "
             + (_describe(f.exitcode) if rank in causes else
                "was stopped by torchrun after that failure")
             + ("" if rank == 0 or rank not in causes else _log_tail(rank))
             for rank, f in failures]
    print("\n".join(lines), file=sys.stderr, flush=True)
    return USER_ERROR if _user_errors_only(error.failures) else 1


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    _one_request_per_window(float(os.environ.get("MEGALITE_STOP_WINDOW_S", "10")))
    _no_restart_after_user_errors()
    status, failure = 0, None
    try:
        torch_run.main(argv)
    except elastic_api.SignalException as e:
        status = 128 + int(e.sigval)
    except elastic_errors.ChildFailedError as e:
        failure = e
    outcome = _outcome()
    if outcome and outcome.get("status") in ("finished", "stopped"):
        return 0
    return report_failure(failure) if failure is not None else status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
