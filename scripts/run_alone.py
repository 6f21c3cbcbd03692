"""Run a command with every other Python process on the machine paused (SIGSTOP), resumed (SIGCONT) at the end.

    python scripts/run_alone.py qdiff bench cpu --engine openvino --rounds 5

For benchmark windows on a shared 2-core machine (other agents' or users' jobs): ratios measured side by side still
suffer when other jobs share the cores, caches and memory bandwidth, and `nice` does not fix that (a bench at nice -15
measured the SDXL bf16 call at 6.8 s beside others vs 0.84 s alone). Python processes started meanwhile are paused too,
within a second. The command's own process tree and this script's ancestors are never paused; everything paused is
resumed when the command ends, however it ends. Linux only (/proc).
"""

import os
import signal
import subprocess
import sys
import time


def children() -> dict[int, int]:
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    out[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def main() -> int:
    proc = subprocess.Popen(sys.argv[1:])
    me, stopped = os.getpid(), set()
    ancestors = set()
    pid = me
    parents = children()
    while pid in parents and pid > 1:
        ancestors.add(pid)
        pid = parents[pid]
    try:
        while proc.poll() is None:
            parents = children()
            mine = {proc.pid, me}
            grew = True
            while grew:
                new = {p for p, pp in parents.items() if pp in mine} - mine
                grew = bool(new)
                mine |= new
            for p in parents:
                if p in mine or p in ancestors or p in stopped:
                    continue
                if "python" in cmdline(p):
                    try:
                        os.kill(p, signal.SIGSTOP)
                        stopped.add(p)
                    except ProcessLookupError:
                        pass
            time.sleep(1)
    finally:
        for p in stopped:
            try:
                os.kill(p, signal.SIGCONT)
            except ProcessLookupError:
                pass
        print(f"run_alone: paused {len(stopped)} other python processes during the run", file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
