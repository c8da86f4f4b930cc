"""``python -m pipelines.reaper PID TEMP_DIR``: ends what a faceforge driver's private Ray leaves behind.

Started by ``ensure_ray`` in its own session (a Ctrl-C or a SIGTERM to the driver's process group does not
reach it). While the driver lives it notes every process the driver has started, directly or through Ray's
raylet; once the driver is gone, however it went (SIGKILL, a crash, Ray ending it when its raylet died),
every noted process still running is terminated, then killed, and Ray's temp folder is removed. A driver
that stops Ray itself (``stop_ray``) leaves the reaper nothing to do.
"""

from __future__ import annotations

import shutil
import sys
import time


def reap(driver_pid: int, temp_dir: str | None, interval_s: float = 0.5, grace_s: float = 3.0) -> None:
    import psutil

    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return
    me = psutil.Process()
    seen: dict[int, float] = {}
    while True:
        try:
            if driver.status() == psutil.STATUS_ZOMBIE:
                break
            for child in driver.children(recursive=True):
                if child.pid != me.pid:
                    seen[child.pid] = child.create_time()
        except psutil.NoSuchProcess:
            break
        time.sleep(interval_s)
    left = []
    for pid, created in seen.items():
        try:
            process = psutil.Process(pid)
            if process.create_time() == created:  # not a new process that reuses the number
                left.extend([process, *process.children(recursive=True)])
        except psutil.NoSuchProcess:
            continue
    for process in left:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(left, timeout=grace_s)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    if temp_dir:
        shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    reap(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)
