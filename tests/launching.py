"""./launch.sh as the tests run it: in its own session, its output read line by line, its
processes (torchrun, the workers) found under it; the tiny 2-rank run they share.

Every wait is on a condition (a line of output, an exit), never on the clock.
"""

import os
import subprocess
import threading

from test_train import tiny_args

TWO_RANKS = ["--parallel.dp=2", "--train.micro_batch_size=4"]
# enough steps (tens of milliseconds each) that a signal sent at step 3 lands long before
# the end
STEPS = 60
LAUNCH_TIMEOUT_S = 240
# what launch.sh reads to find the nodes and ranks (megalite/parallel/cluster.py)
LAUNCH_VARS = {"NNODES", "NODE_RANK", "NPROC_PER_NODE", "MASTER_ADDR", "MASTER_PORT", "RDZV_ID", "RDZV_CONF",
               "WORLD_SIZE", "RANK", "LOCAL_RANK"}
LAUNCH_PREFIXES = ("SLURM_", "TORCHELASTIC_")


def launch_args(cache, run_dir, extra=()):
    return ["./launch.sh", "configs/tiny.yaml",
            *tiny_args(cache, run_dir, steps=STEPS, extra=TWO_RANKS), *extra]


class Launch:
    """./launch.sh in its own session, its output collected by a reader thread."""

    def __init__(self, args, under_timeout=False, env=None):
        """`env`: the launch's variables (NNODES, SLURM_*, ...); this process's own never
        reach it, so a test on a Slurm node runs as anywhere else."""
        args = ["timeout", "900", *args] if under_timeout else args
        environ = {k: v for k, v in os.environ.items()
                   if not k.startswith(LAUNCH_PREFIXES) and k not in LAUNCH_VARS}
        environ.update(env or {})
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True, env=environ)
        self.lines, self.changed = [], threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()
        with self.changed:
            self.lines.append(None)  # end of output
            self.changed.notify_all()

    def wait_for(self, text: str, timeout=LAUNCH_TIMEOUT_S) -> None:
        with self.changed:
            ok = self.changed.wait_for(
                lambda: None in self.lines or any(text in line for line in self.lines
                                                  if line), timeout)
        assert ok and any(text in line for line in self.lines if line), \
            f"never saw {text!r}:\n{self.output}"

    def finish(self, timeout=LAUNCH_TIMEOUT_S) -> int:
        code = self.proc.wait(timeout=timeout)
        self.wait_for_end()
        return code

    def wait_for_end(self):
        with self.changed:
            self.changed.wait_for(lambda: None in self.lines, 30)

    @property
    def output(self) -> str:
        return "".join(line for line in self.lines if line)

    def torchrun_pid(self) -> int:
        launcher = self.proc.pid
        if os.path.basename(os.readlink(f"/proc/{launcher}/exe")).startswith("timeout"):
            launcher = children(launcher)[0]
        return next(p for p in children(launcher) if b"megalite.parallel.torchrun" in
                    open(f"/proc/{p}/cmdline", "rb").read())

    def launcher_pid(self) -> int:
        return self.proc.pid


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def workers(torchrun: int) -> list[int]:
    return children(torchrun)
