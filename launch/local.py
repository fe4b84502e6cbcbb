#!/usr/bin/env python3
"""Start N processes of one command on this machine as one jax.distributed job.

    python launch/local.py --num_processes=2 --devices_per_process=4 -- nodepert-train --lr=0.01

Each process gets NODEPERT_COORDINATOR_ADDRESS (127.0.0.1 and a free port), NODEPERT_NUM_PROCESSES
and NODEPERT_PROCESS_ID (read by nodepert_dist.distributed.initialize when the flags are absent).
Devices (--platform): on GPUs (auto, when nvidia-smi or CUDA_VISIBLE_DEVICES shows any and
JAX_PLATFORMS does not exclude them) each rank gets its own --devices_per_process GPUs (0: an
equal share) via CUDA_VISIBLE_DEVICES, round-robin, and a share of the memory when ranks must
share a GPU (nodepert_dist/gpus.py); on CPU, --devices_per_process=K simulated CPU devices via
XLA_FLAGS=--xla_force_host_platform_device_count=K. Every output line is prefixed with its rank.
If any process exits non-zero, or the job outlives --timeout_s, every process group is killed
and the launcher exits non-zero with one line naming the rank (status 1; 124 for the timeout).
Preemption: SIGTERM or SIGUSR1 to the launcher is forwarded to every rank; a rank that exits
with PREEMPTED (75: checkpoint saved, nodepert_dist/preempt.py) is not a failure, the others
get --grace_s to do the same, and the launcher then exits 75 too.
Standard library and nodepert_dist/gpus.py only: it does not import jax.
"""

from __future__ import annotations

import argparse
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nodepert_dist import gpus  # noqa: E402 (the checkout's, also when not installed)

ENV_COORDINATOR = "NODEPERT_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "NODEPERT_NUM_PROCESSES"
ENV_PROCESS_ID = "NODEPERT_PROCESS_ID"
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
PREEMPTED = 75  # nodepert_dist.preempt.EXIT_CODE (this file does not import the package)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def child_env(
    base: dict,
    rank: int,
    num_processes: int,
    address: str,
    devices_per_process: int,
    gpu_list: list[str] = (),
) -> dict:
    """Rank `rank`'s environment: the job's layout, and its GPUs from `gpu_list` (none: CPU)."""
    env = dict(base)
    env[ENV_COORDINATOR] = address
    env[ENV_NUM_PROCESSES] = str(num_processes)
    env[ENV_PROCESS_ID] = str(rank)
    env["PYTHONUNBUFFERED"] = "1"
    if gpu_list:
        return gpus.with_child_env(
            env, gpus.child_env(rank, num_processes, list(gpu_list), devices_per_process)
        )
    if devices_per_process > 0:
        kept = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
        env["XLA_FLAGS"] = " ".join(kept + [f"{DEVICE_COUNT_FLAG}={devices_per_process}"])
        env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with status {rc}"


class StartError(RuntimeError):
    """A rank could not be started; the message is one line."""


class Job:
    """The running processes, their output pumps and one event queue: ("exit", rank, status)
    from the waiter threads and ("signal", signum) from the launcher's signal handlers."""

    def __init__(
        self,
        command,
        num_processes,
        devices_per_process,
        address,
        gpu_list=(),
        out=sys.stdout,
        events: queue.SimpleQueue | None = None,
    ):
        self.out, self.lock = out, threading.Lock()
        # SimpleQueue.put is reentrant: a signal handler may call it whatever the main thread
        # holds (a handler that took self.lock or wrote to stdout itself could deadlock).
        self.events = events if events is not None else queue.SimpleQueue()
        self.procs: list[subprocess.Popen] = []
        self.pumps: list[threading.Thread] = []
        width = len(str(num_processes - 1))
        for rank in range(num_processes):
            env = child_env(os.environ, rank, num_processes, address, devices_per_process, gpu_list)
            try:
                p = subprocess.Popen(
                    command,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            except OSError as e:  # the ranks already started must not outlive the launcher
                self.kill_all()
                raise StartError(
                    f"rank {rank} could not start {command[0]!r}: {e.strerror}"
                ) from None
            self.procs.append(p)
            on = f" on GPU(s) {env[gpus.VISIBLE]}" if gpu_list else ""
            self.say(f"[launch] rank {rank} pid {p.pid}{on}")
            pump = threading.Thread(target=self._pump, args=(p, f"[{rank:>{width}}] "), daemon=True)
            pump.start()
            self.pumps.append(pump)
            threading.Thread(target=self._wait, args=(rank, p), daemon=True).start()

    def say(self, line: str) -> None:
        with self.lock:
            self.out.write(line + "\n")
            self.out.flush()

    def _pump(self, p, prefix):
        for raw in iter(p.stdout.readline, b""):
            self.say(prefix + raw.decode(errors="replace").rstrip("\n"))

    def _wait(self, rank, p):
        self.events.put(("exit", rank, p.wait()))

    def kill_all(self, grace_s: float = 5.0) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in self.procs:
                if p.poll() is None:
                    try:
                        os.killpg(p.pid, sig)
                    except ProcessLookupError:
                        pass
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
                time.sleep(0.05)
        for pump in self.pumps:
            pump.join(timeout=2)

    def signal_all(self, sig) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.kill(p.pid, sig)
                except ProcessLookupError:
                    pass

    def wait(self, timeout_s: float, grace_s: float = 120.0) -> tuple[int, str]:
        """(exit status, reason); status 0 once every rank exited 0, PREEMPTED once every rank
        exited 0 or PREEMPTED with at least one PREEMPTED. SIGTERM/SIGUSR1 events are forwarded
        to every rank; SIGINT kills them all (status 128 + SIGINT)."""
        deadline = time.monotonic() + timeout_s
        finished, preempted = 0, 0
        while finished < len(self.procs):
            try:
                event = self.events.get(timeout=max(0.0, min(0.5, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    running = [str(r) for r, p in enumerate(self.procs) if p.poll() is None]
                    return 124, (
                        f"timeout after {timeout_s:g} s with rank(s) {', '.join(running)} "
                        f"still running; killed all"
                    )
                continue
            if event[0] == "signal":
                name = signal.Signals(event[1]).name
                if event[1] == signal.SIGINT:
                    return 128 + event[1], f"launcher got {name}; killed all ranks"
                self.say(f"[launch] got {name}; forwarded it to every rank")
                self.signal_all(event[1])  # preemption: they checkpoint and exit PREEMPTED
                continue
            _, rank, rc = event
            finished += 1
            if rc == PREEMPTED:  # the others stop at the same step: give them time to
                preempted += 1
                deadline = min(deadline, time.monotonic() + grace_s)
            elif rc != 0:
                return 1, f"rank {rank} {describe_exit(rc)}; killed the other ranks"
        for pump in self.pumps:
            pump.join(timeout=5)
        if preempted:
            return PREEMPTED, f"preempted: {preempted} rank(s) checkpointed and exited {PREEMPTED}"
        return 0, "all ranks exited 0"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], usage="%(prog)s [options] -- command [args...]"
    )
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument(
        "--devices_per_process",
        type=int,
        default=0,
        help="GPUs per process (0: an equal share), or on CPU simulated devices per process "
        "(0: leave the platform alone)",
    )
    parser.add_argument(
        "--platform",
        choices=("auto", "gpu", "cpu"),
        default="auto",
        help="auto: the GPUs when this machine shows any, else CPU; gpu: fail without GPUs",
    )
    parser.add_argument(
        "--timeout_s",
        type=float,
        default=3600,
        help="kill everything and fail after this many seconds",
    )
    parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
    parser.add_argument(
        "--grace_s",
        type=float,
        default=120,
        help="after a signal or a preempted rank, wait this long for the others",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (put it after --)")
    if args.num_processes < 1:
        parser.error("--num_processes must be >= 1")
    for name, ok in (
        ("devices_per_process", args.devices_per_process >= 0),
        ("timeout_s", args.timeout_s > 0),
        ("grace_s", args.grace_s >= 0),
        ("port", 0 <= args.port < 65536),
    ):
        if not ok:
            parser.error(f"--{name}={getattr(args, name)} is out of range")
    if shutil.which(command[0]) is None:  # before any rank starts: one line, no traceback
        print(
            f"error: {command[0]!r} is not an executable here (not on PATH, or not "
            f"executable); check the command after --",
            file=sys.stderr,
        )
        return 2
    gpu_list = gpus.machine_gpus() if args.platform != "cpu" else []
    if args.platform == "gpu" and not gpu_list:
        print(
            "error: --platform=gpu but no GPU is visible here (nvidia-smi -L lists none, or "
            "CUDA_VISIBLE_DEVICES/JAX_PLATFORMS exclude them); use --platform=cpu",
            file=sys.stderr,
        )
        return 2
    address = f"127.0.0.1:{args.port or free_port()}"

    # Signals are caught before any rank starts and only queued (one arriving while they start
    # is acted on once they all exist), so a rank never outlives a launcher killed by them.
    events: queue.SimpleQueue = queue.SimpleQueue()
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: events.put(("signal", signum)))
    try:
        job = Job(
            command, args.num_processes, args.devices_per_process, address, gpu_list, events=events
        )
    except StartError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    kind = "GPU" if gpu_list else "CPU"
    job.say(
        f"[launch] {args.num_processes} process(es) x {args.devices_per_process or 'default'} "
        f"{kind} device(s), coordinator {address}: {' '.join(command)}"
    )
    try:
        status, reason = job.wait(args.timeout_s, args.grace_s)
    finally:
        if any(p.poll() is None for p in job.procs):
            job.kill_all()
    if status == PREEMPTED:
        job.say(f"[launch] {reason}")
    elif status:
        job.say(f"[launch] error: {reason}")
    return status


if __name__ == "__main__":
    sys.exit(main())
