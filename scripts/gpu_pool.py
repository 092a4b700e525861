"""Runs live jobs on several GPUs of one host at once, one job per GPU at a time.

A device session's time is counted per machine, not per GPU, so a host of four GPUs serves
four live runs in the time of one. Each job runs in its own process with
`CUDA_VISIBLE_DEVICES` set to its GPU, so no two live runs share a GPU (they would disturb
each other's timings, which is what the runs measure).

A GPU can be lent to something else for a while (e.g. a benchmark started beside the pool):
while `busy_dir/gpu<N>.busy` exists, no job starts on GPU N.
"""

import os
import queue
import threading
import time


def run_jobs(jobs, gpus, work, deadline=None, estimate=None, busy_dir=None, log=print):
    """Runs `work(job, env)` for every job, on the GPUs listed in `gpus` (device indices,
    or [None] to leave the environment alone), longest-estimated first.

    `deadline`: a `time.monotonic()` value; a job whose `estimate(job)` seconds would end
    after it is not started (returned as skipped). Returns (results in job order, skipped
    jobs). `work` returns the job's result; an exception is logged and becomes None.
    """
    order = sorted(range(len(jobs)), key=lambda i: -(estimate(jobs[i]) if estimate else 0))
    todo = queue.Queue()
    for i in order:
        todo.put(i)
    results = [None] * len(jobs)
    skipped = []
    lock = threading.Lock()

    def worker(gpu):
        env = dict(os.environ)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        busy = os.path.join(busy_dir, f"gpu{gpu}.busy") if busy_dir and gpu is not None else None
        while True:
            # Take no job while the GPU is lent out: another GPU may take it meanwhile.
            while busy and os.path.exists(busy) and not todo.empty():
                if deadline is not None and time.monotonic() > deadline:
                    return
                time.sleep(1.0)
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            need = estimate(jobs[i]) if estimate else 0
            if deadline is not None and time.monotonic() + need > deadline:
                with lock:
                    skipped.append(jobs[i])
                log(f"skipped (deadline): {jobs[i]}")
                continue
            start = time.monotonic()
            try:
                results[i] = work(jobs[i], env)
            except Exception as e:  # one failed job must not lose the others
                log(f"job failed: {jobs[i]}: {e!r}")
                results[i] = None
            log(f"gpu {gpu}: {jobs[i]} done in {time.monotonic() - start:.0f} s")

    threads = [threading.Thread(target=worker, args=(g,)) for g in gpus]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, skipped


def parse_gpus(text):
    """'0,1,2' -> [0, 1, 2]; '' or None -> [None] (one worker, environment unchanged)."""
    if not text:
        return [None]
    return [int(x) for x in text.split(",") if x.strip() != ""]
