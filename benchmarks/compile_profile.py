"""Where a compile's time goes, for ``compile_time.py``: a stack sampler (wall time by function,
charged to whoever waits), cProfile summaries (top functions, aether's excess over the default
compile, the callers of Triton's code generation), Triton's own compile log, and the CPU seconds
of the process and its compiler children."""

from __future__ import annotations

import collections
import cProfile
import io
import os
import pstats
import sys
import threading
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def function_name(file: str, line: int, name: str) -> str:
    """``path:line(name)`` as the profiles and the sampler list a function: a path in this
    repository relative to it, any other by its file name."""
    where = os.path.relpath(file, ROOT) if file.startswith(ROOT) else os.path.basename(file)
    return f"{where}:{line}({name})"


class StackSampler:
    """Wall time of the calling thread by function, from its stack sampled every ``interval`` s
    by another thread: inclusive (the function is on the stack) and leaf (it is on top). Unlike
    cProfile it does not slow the traced code down unevenly, and a wait (the GIL, a lock, a
    child process) is charged to whoever waits."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.inclusive: collections.Counter = collections.Counter()
        self.leaf: collections.Counter = collections.Counter()
        self.seconds = 0.0

    def __enter__(self):
        self.target = threading.get_ident()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="stack-sampler", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        return False

    def _run(self):
        last = time.perf_counter()
        while not self.done.wait(self.interval):
            now = time.perf_counter()
            weight, last = now - last, now
            frame = sys._current_frames().get(self.target)
            seen = set()
            while frame is not None:
                code = frame.f_code
                key = function_name(code.co_filename, code.co_firstlineno, code.co_name)
                if not seen:
                    self.leaf[key] += weight
                if key not in seen:
                    seen.add(key)
                    self.inclusive[key] += weight
                frame = frame.f_back
            self.seconds += weight


def sampled_excess(runs: dict, n: int = 80) -> dict:
    """Mean seconds per compile by function, aether minus inductor, from the runs' samples."""
    def mean(backend, kind):
        total: collections.Counter = collections.Counter()
        for run in runs[backend]:
            total.update(run["samples"][kind])
        return {k: v / len(runs[backend]) for k, v in total.items()}

    out = {}
    for kind in ("inclusive", "leaf"):
        a, i = mean("aether", kind), mean("inductor", kind)
        rows = sorted(((round(a.get(k, 0.0) - i.get(k, 0.0), 3), round(a.get(k, 0.0), 3), k)
                       for k in set(a) | set(i)), reverse=True)
        out[kind] = rows[:n]
    return out


class TritonCompileLog(list):
    """Every Triton compile this process runs (any thread) while the block runs, through Triton's
    compile listener: (s from ``mark``, kernel, cache hit, ms, thread, the nearest callers outside
    Triton). Inductor's workers compile elsewhere; a Triton without the listener logs nothing."""

    def __init__(self, mark: float, limit: int = 200):
        super().__init__()
        self.mark, self.limit = mark, limit

    def __enter__(self):
        try:
            from triton import knobs
            self.knobs, self.before = knobs.compilation, knobs.compilation.listener
        except (ImportError, AttributeError):
            self.knobs = None
            return self

        def listener(**kw):
            if len(self) < self.limit:
                times = kw.get("times")
                ms = None
                if times is not None:
                    ms = round((times.ir_initialization + times.total_lowering
                                + times.store_results) / 1e3, 1)
                callers = [f"{os.path.basename(f.filename)}:{f.lineno}({f.name})"
                           for f in traceback.extract_stack()[:-1]
                           if "/triton/" not in f.filename][-3:]
                self.append((round(time.monotonic() - self.mark, 3),
                             getattr(kw["src"], "name", str(kw["src"])[:40]), kw["cache_hit"], ms,
                             threading.current_thread().name, callers))
            if self.before is not None:
                self.before(**kw)

        self.knobs.listener = listener
        return self

    def __exit__(self, *exc):
        if self.knobs is not None:
            self.knobs.listener = self.before
        return False


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads) and its reaped children (g++)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def profile_top(profiler: cProfile.Profile, n: int = 25, key: str = "cumtime_s",
                ours: bool = False) -> list:
    """The top ``n`` functions by ``key``; ``ours``: only functions of this repository."""
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = []
    for (file, line, fn), (cc, nc, tt, ct, _) in stats.stats.items():
        if ours and not file.startswith(ROOT):
            continue
        rows.append({"function": function_name(file, line, fn), "calls": nc,
                     "tottime_s": round(tt, 4), "cumtime_s": round(ct, 4)})
    rows.sort(key=lambda r: -r[key])
    return rows[:n]


# Functions whose callers a compile profile lists: where Triton code generation and Torch's
# repro string come from
TRACED_CALLEES = ("generate_ttir", "make_ir", "identify_accessed_tensors",
                  "identify_mutated_tensors", "save_graph_repro")


def profile_excess(aether: cProfile.Profile, inductor: cProfile.Profile, n: int = 150) -> list:
    """Functions by how much longer they ran (cumulative) in the aether compile than in the
    default one: where the excess goes, attributed through the call tree."""
    def cumulative(profiler):
        stats = pstats.Stats(profiler, stream=io.StringIO())
        return {function_name(file, line, fn): (nc, ct, tt)
                for (file, line, fn), (cc, nc, tt, ct, _) in stats.stats.items()}

    a, i = cumulative(aether), cumulative(inductor)
    rows = [{"function": k, "excess_cum_s": round(a.get(k, (0, 0.0, 0.0))[1]
                                                  - i.get(k, (0, 0.0, 0.0))[1], 4),
             "excess_own_s": round(a.get(k, (0, 0.0, 0.0))[2] - i.get(k, (0, 0.0, 0.0))[2], 4),
             "calls": [a.get(k, (0,))[0], i.get(k, (0,))[0]]} for k in set(a) | set(i)]
    rows.sort(key=lambda r: -r["excess_cum_s"])
    return rows[:n]


def profile_callers(profiler: cProfile.Profile) -> dict:
    """For each function named in TRACED_CALLEES: its callers, with calls and cumulative time."""
    stats = pstats.Stats(profiler, stream=io.StringIO())
    found = {}
    for (file, line, fn), (cc, nc, tt, ct, callers) in stats.stats.items():
        if fn not in TRACED_CALLEES:
            continue
        found[f"{os.path.basename(file)}:{line}({fn})"] = {
            "calls": nc, "cumtime_s": round(ct, 4),
            "callers": sorted(([f"{os.path.basename(cf)}:{cl}({cn})", c[1], round(c[3], 4)]
                               for (cf, cl, cn), c in callers.items()), key=lambda r: -r[2])}
    return found
