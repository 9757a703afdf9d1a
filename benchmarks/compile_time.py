"""Cold compile time: default Inductor vs ``backend="aether"`` (issue 5 target: aether <= 1.2x).

One command (GPU: about 2-3 minutes for the 8 models; the device copy has no .git, so name the
commit it was copied from):

    AETHER_COMMIT=<sha> python benchmarks/compile_time.py --out benchmarks/results

On a machine without CUDA it runs on CPU with ``allow_cpu=True`` (the op runs its plain-torch
reference there) and writes ``compile_time_cpu.json``; on CUDA ``compile_time_<card>.json``.

Each measurement is cold: ``torch._dynamo.reset()``, the FX graph cache and the AOTAutograd cache
off, and a fresh Inductor/Triton cache directory with Inductor's in-memory caches cleared
(``torch._inductor.utils.fresh_cache``), so neither side reuses kernels the other compiled. One
warm-up compile per backend first pays the one-time costs (imports, CPU SIMD probe, compile
workers; on CUDA a whole zoo model too, ``--warm-up-model``). Compile seconds = first call -
steady call (forward, eval mode, no_grad), as wall time and, on CPU, as CPU seconds of the
process and its g++ children (Inductor's ``compile_threads=1`` there, for both backends, so every
compile runs in counted processes): other load on a shared machine inflates wall time far more
than CPU time. The two backends alternate order per model and per repeat; before each compile our
in-process state is dropped (``forget_our_state``), so a repeat is as cold for aether as a new
process's first compile. Per model: seconds per repeat; ratio aether/inductor of the medians, of
the minima, of the means and of the median CPU seconds; time inside the rewrite pass, sites
rewritten, output difference.

Models: built here rather than taken from tests/models/zoo.py, whose cases have fixed lengths of
16-64 and position tables to match; compile time is measured where the sparse path compiles, at
``--seq`` 1024 on CUDA. Where the time goes (sampler, profiles, Triton's compile log) lives in
compile_profile.py. Tiny transformers configs (random init) with position tables long enough for
``--seq`` (default 1024 on CUDA, 128 on CPU), plus a nanoGPT block. On CUDA attention this small is
"short" (ops.static_dense_reason: <= 8 key blocks, or little work): the pass leaves it as written,
so both backends compile the same graph, while long sequences get the sparse path. The benchmark
sets ``AETHER_STATIC_DENSE=0`` (read while tracing) so every site compiles the sparse path, the
worst case; ``--static-dense`` keeps the default choices. On CPU the op is its plain-torch
reference either way. ``--profile`` adds a cProfile of the rewrite pass (top functions by cumulative time)
to the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import unittest.mock

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a source checkout without an install
    sys.path.insert(0, ROOT)

import aether_compile  # noqa: E402,F401  (registers torch.ops.aether.* and the backend)
import provenance  # noqa: E402
from provenance import write_json  # noqa: E402
import aether_compile.passes.rewrite as aether_passes  # noqa: E402
from aether_compile.inductor import access as inductor_access  # noqa: E402
from aether_compile.inductor import early_compile  # noqa: E402
from aether_compile.inductor import precompile  # noqa: E402
from compile_profile import (  # noqa: E402
    StackSampler, TritonCompileLog, cpu_seconds, profile_callers, profile_excess, profile_top,
    sampled_excess)

TARGET_RATIO = 1.2
MODELS = ("bert", "gpt2", "llama", "qwen2", "vit", "whisper", "distilbert", "nanogpt")


# -- environment -----------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def env_record(device: str) -> dict:
    """provenance.env_record plus the CPU's name and load (compile time is host time)."""
    return provenance.env_record(device, cpu=cpu_name(), loadavg_start=loadavg())


def loadavg():
    """1-minute load average (other work on the machine skews wall-clock compile times)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# -- models ----------------------------------------------------------------------------------------
def _ids(B, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 99, (B, L), generator=g)


def _padding(B, L):
    m = torch.ones(B, L, dtype=torch.long)
    m[-1, (3 * L) // 4:] = 0
    return m


def _hf(cls, cfg_cls, impl, **cfg):
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, cfg_cls)(**cfg)
    config._attn_implementation = impl
    return getattr(transformers, cls)(config).eval()


def build(name: str, L: int):
    """(model, kwargs or args, output -> tensor, attention layers); CPU fp32 tensors."""
    P = max(2 * L, 128)  # position tables
    text = dict(input_ids=_ids(2, L), attention_mask=_padding(2, L))
    hidden = lambda o: o.last_hidden_state  # noqa: E731
    dec = dict(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=64, max_position_embeddings=P,
               use_cache=False)
    if name == "bert":
        return (_hf("BertModel", "BertConfig", "sdpa", vocab_size=99, hidden_size=64,
                    num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    max_position_embeddings=P), text, hidden, 2)
    if name == "distilbert":  # the eager (softmax) spelling
        return (_hf("DistilBertModel", "DistilBertConfig", "eager", vocab_size=99, dim=64,
                    n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=P), text,
                hidden, 2)
    if name == "gpt2":  # eager spelling: matmul, constant scale, causal buffer mask, softmax
        return (_hf("GPT2Model", "GPT2Config", "eager", vocab_size=99, n_embd=64, n_layer=2,
                    n_head=4, n_positions=P, use_cache=False, bos_token_id=2, eos_token_id=2),
                text, hidden, 2)
    if name == "llama":
        return _hf("LlamaModel", "LlamaConfig", "sdpa", **dec), text, hidden, 2
    if name == "qwen2":
        return _hf("Qwen2Model", "Qwen2Config", "sdpa", **dec), text, hidden, 2
    if name == "vit":  # L patches of 8x8 (+ CLS token)
        side = 8 * max(2, int(math.isqrt(L)))
        g = torch.Generator().manual_seed(0)
        return (_hf("ViTModel", "ViTConfig", "sdpa", image_size=side, patch_size=8,
                    hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64),
                dict(pixel_values=torch.randn(2, 3, side, side, generator=g)), hidden, 2)
    if name == "whisper":  # encoder self-, decoder self- (causal) and cross-attention
        g = torch.Generator().manual_seed(0)
        return (_hf("WhisperModel", "WhisperConfig", "sdpa", vocab_size=99, d_model=64,
                    encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                    decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                    num_mel_bins=8, max_source_positions=L, max_target_positions=P,
                    use_cache=False, pad_token_id=1, bos_token_id=2, eos_token_id=2,
                    decoder_start_token_id=2),
                dict(input_features=torch.randn(2, 8, 2 * L, generator=g),
                     decoder_input_ids=_ids(2, L)), hidden, 3)
    if name == "nanogpt":
        from tests.models.spellings import NanoGPTBlock

        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        return (NanoGPTBlock(n_embd=64, n_head=4, flash=False, block_size=P).eval(),
                (torch.randn(2, L, 64, generator=g),), (lambda o: o), 1)
    raise ValueError(f"unknown model {name!r}; known: {MODELS}")


def _to(x, device, dtype):
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
    if isinstance(x, dict):
        return {k: _to(v, device, dtype) for k, v in x.items()}
    return tuple(_to(v, device, dtype) for v in x)


# -- measurement -----------------------------------------------------------------------------------
class PassTimer:
    """Wraps aether_compile.passes.rewrite_attention (the backend looks it up per call): seconds
    spent inside, and optionally a cProfile of it."""

    def __init__(self, profile: bool):
        self.real = aether_passes.rewrite_attention
        self.seconds = 0.0
        self.profiler = cProfile.Profile() if profile else None

    def __call__(self, gm, options):
        t0 = time.perf_counter()
        if self.profiler is not None:
            self.profiler.enable()
        try:
            return self.real(gm, options)
        finally:
            if self.profiler is not None:
                self.profiler.disable()
            self.seconds += time.perf_counter() - t0

    def __enter__(self):
        aether_passes.rewrite_attention = self
        return self

    def __exit__(self, *exc):
        aether_passes.rewrite_attention = self.real
        return False


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _call(compiled, inputs):
    return compiled(**inputs) if isinstance(inputs, dict) else compiled(*inputs)


def measure(model, inputs, backend: str, device: str, allow_cpu: bool, timer: PassTimer,
            cache_dir: str | None = None, profiler: cProfile.Profile | None = None,
            sample: bool = False) -> dict:
    """One compile of ``model`` with ``backend`` ("inductor" or "aether"): cold, or with
    ``cache_dir`` an on-disk Inductor/Triton cache kept between compiles (in-memory caches are
    still cleared, as in a new process). ``profiler`` profiles the first call."""
    import torch._dynamo.utils as dynamo_utils
    import torch._functorch.config as fcfg
    import torch._inductor.config as icfg
    from torch._dynamo.utils import counters
    from torch._inductor.utils import fresh_cache

    torch._dynamo.reset()
    counters.clear()
    dynamo_utils.compilation_time_metrics.clear()
    forget_our_state()
    kwargs = ({"backend": "aether", "options": {"allow_cpu": allow_cpu}} if backend == "aether"
              else {})
    # CPU: compile in this process (one g++ per graph either way), so the CPU seconds of the
    # compile, which other load on the machine inflates far less than wall time, are all counted
    threads = {"compile_threads": 1} if device == "cpu" else {}
    before = timer.seconds
    memo_before = dict(inductor_access.access_analysis_stats)
    early_before = dict(early_compile.early_compile_stats)
    cache = kept_cache(cache_dir) if cache_dir else fresh_cache()
    with cache, icfg.patch(fx_graph_cache=False, **threads), \
            fcfg.patch(enable_autograd_cache=False), torch.no_grad():
        compiled = torch.compile(model, **kwargs)
        sync(device)
        mark = time.monotonic()
        c0, t0 = cpu_seconds(), time.perf_counter()
        if profiler is not None:
            profiler.enable()
        sampler = StackSampler() if sample else contextlib.nullcontext()
        with TritonCompileLog(mark) as triton_compiles, sampler:
            out = _call(compiled, inputs)
            sync(device)
        if profiler is not None:
            profiler.disable()
        first, first_cpu = time.perf_counter() - t0, cpu_seconds() - c0
        steady, steady_cpu = [], []
        for _ in range(3):
            c0, t0 = cpu_seconds(), time.perf_counter()
            _call(compiled, inputs)
            sync(device)
            steady.append(time.perf_counter() - t0)
            steady_cpu.append(cpu_seconds() - c0)
    # Torch's own phase timers (dynamo_timed): where the compile went, phase by phase
    phases = {k: round(sum(v), 4) for k, v in dynamo_utils.compilation_time_metrics.items()
              if sum(v) >= 0.01}
    return {"compile_s": first - min(steady), "compile_cpu_s": first_cpu - min(steady_cpu),
            "phases_s": dict(sorted(phases.items(), key=lambda kv: -kv[1])),
            "first_call_s": first, "steady_call_s": min(steady),
            "pass_s": timer.seconds - before, "out": out,
            "aether": dict(counters["aether"]), "graphs": counters["stats"]["unique_graphs"],
            "access_analysis": {k: v - memo_before[k]  # Triton TTIR analyses run / memoised
                                for k, v in inductor_access.access_analysis_stats.items()},
            "not_memoised_types": dict(inductor_access.not_memoised_types),  # cumulative, per process
            # our traced kernels whose compile Inductor's workers started at generation
            "early_compile": {k: v - early_before[k]
                              for k, v in early_compile.early_compile_stats.items()},
            # the prepare op's precompile: replay, jobs, the first call's wait (s from the call)
            "precompile": [(round(t - mark, 3), event, detail)
                           for t, event, detail in list(precompile.timeline) if t >= mark],
            # Triton compiles in this process (not in Inductor's workers) during the first call
            "triton_compiles": triton_compiles,
            # --sample: the first call's wall time by function (top 300 inclusive, 100 leaf)
            **({"samples": {"inclusive": dict(sampler.inclusive.most_common(300)),
                            "leaf": dict(sampler.leaf.most_common(100))}} if sample else {})}


def forget_our_state() -> None:
    """What a new process would not have of ours: the kernels Triton holds in memory, the
    precompile's record of what it started, the memoised access analyses, the sites' dense
    choices. Without this a repeat in the same process found them all and measured a warmer
    compile than a user's first."""
    from torch._higher_order_ops import triton_kernel_wrap as tkw

    from aether_compile import dense_policy
    from aether_compile.kernels import launch, registry

    for kernel in registry.JIT_KERNELS:
        kernel.device_caches = type(kernel.device_caches)(kernel.device_caches.default_factory)
    with precompile._lock:
        precompile._started.clear()
    for name in inductor_access.ACCESS_ANALYSIS_FNS:
        getattr(getattr(tkw, name, None), "cache", {}).clear()
    launch.clear_eager_constants()
    dense_policy.forget_lagged_choices()


@contextlib.contextmanager
def kept_cache(cache_dir: str):
    """Inductor's and Triton's on-disk caches in ``cache_dir``, kept between compiles; in-memory
    caches cleared first, so a compile sees what a new process on a warm machine sees."""
    from torch._inductor.utils import clear_caches

    clear_caches()
    env = {"TORCHINDUCTOR_CACHE_DIR": cache_dir,
           "TRITON_CACHE_DIR": os.path.join(cache_dir, "triton")}
    with unittest.mock.patch.dict(os.environ, env):
        yield


def warm_up(device: str, dtype, allow_cpu: bool, timer: PassTimer, model: str | None,
            L: int) -> None:
    """Untimed compiles per backend: an SDPA function, then ``model`` (a zoo model: lowerings,
    kernels' first launches, library handles; at 6e03aa8, with the SDPA function alone, both
    backends' first whisper compiles took 8 s against 5-7 s later)."""
    import torch.nn.functional as F

    def attn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v).sin()

    g = torch.Generator().manual_seed(0)
    qkv = tuple(torch.randn(1, 2, 64, 16, generator=g).to(device, dtype) for _ in range(3))
    cases = [(attn, qkv)]
    if model:
        net, inputs, _, _ = build(model, L)
        cases.append((net.to(device=device, dtype=dtype), _to(inputs, device, dtype)))
    for fn, inputs in cases:
        for backend in ("inductor", "aether"):
            measure(fn, inputs, backend, device, allow_cpu, timer)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--repeats", type=int, default=1, help="cold compiles per backend and model")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (1024 CUDA, 128 CPU)")
    ap.add_argument("--device", default=None, help="cuda if available, else cpu")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="soft deadline: models not started by then are recorded as skipped "
                         "(default 220 s on CUDA, keeping the run under 4 minutes; none on CPU)")
    ap.add_argument("--profile", action="store_true", help="cProfile the rewrite pass")
    ap.add_argument("--warm", action="store_true",
                    help="keep Inductor's and Triton's on-disk caches between compiles (the FX "
                         "graph and AOTAutograd caches stay off): one untimed compile per "
                         "backend and model first, then the timed ones see what a later process "
                         "sees")
    ap.add_argument("--profile-compile", default=None, metavar="MODEL",
                    help="cProfile the first (compiling) call of MODEL for each backend; the top "
                         "functions by cumulative and by own time go into the JSON")
    ap.add_argument("--warm-up-model", default=None,
                    help="a zoo model compiled untimed per backend before the timed ones "
                         "(default: bert on CUDA, none on CPU; '' for none)")
    ap.add_argument("--sample", action="store_true",
                    help="sample the first call's stack (StackSampler) and record, per model, "
                         "the functions by aether-minus-inductor wall seconds")
    ap.add_argument("--tag", default="", help="suffix of the output file name")
    ap.add_argument("--static-dense", action="store_true",
                    help="keep the default choices: short CUDA sites stay dense (default: "
                         "AETHER_STATIC_DENSE=0, every site compiles the sparse path)")
    args = ap.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device == "cuda" else torch.float32
    allow_cpu = device != "cuda"
    L = args.seq or (1024 if device == "cuda" else 128)
    if args.warm_up_model is None:
        args.warm_up_model = "bert" if device == "cuda" else ""
    budget = args.budget_s if args.budget_s is not None else (220.0 if device == "cuda"
                                                               else math.inf)
    models = [m for m in args.models.split(",") if m]
    if not args.static_dense:
        os.environ["AETHER_STATIC_DENSE"] = "0"
    env = env_record(device)
    tag = "cpu" if device == "cpu" else (env["card"] or "cuda").replace(" ", "_")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"compile_time_{tag}{args.tag}.json")
    record = {"benchmark": "compile_time", "env": env,
              "config": {"seq": L, "dtype": str(dtype).replace("torch.", ""), "batch": 2,
                         "warm_up_model": args.warm_up_model or None,
                         "repeats": args.repeats, "allow_cpu": allow_cpu,
                         "budget_s": budget if math.isfinite(budget) else None,
                         "AETHER_STATIC_DENSE": os.environ.get("AETHER_STATIC_DENSE"),
                         "AETHER_ACCESS_MEMO": os.environ.get("AETHER_ACCESS_MEMO", "1"),
                         "AETHER_PRECOMPILE": os.environ.get("AETHER_PRECOMPILE", "1"),
                         "AETHER_EARLY_COMPILE": os.environ.get("AETHER_EARLY_COMPILE", "1"),
                         "caches": ("fx_graph_cache=False, enable_autograd_cache=False, " + (
                             "on-disk Inductor/Triton caches kept (warm), in-memory cleared"
                             if args.warm else "fresh_cache() per compile (cold)")),
                         "mode": "eval, no_grad"},
              "target_ratio": TARGET_RATIO, "models": {}, "skipped": [], "summary": {}}
    start = time.perf_counter()
    timer = PassTimer(args.profile)
    print(f"compile_time: {device} ({env['card'] or env['cpu']}), torch {env['torch']}, "
          f"commit {env['commit']}, seq {L}, models {models}", flush=True)
    with timer:
        t0 = time.perf_counter()
        warm_up(device, dtype, allow_cpu, timer, args.warm_up_model, L)
        timer.seconds = 0.0
        print(f"  warm-up {time.perf_counter() - t0:.1f}s", flush=True)
        for i, name in enumerate(models):
            if time.perf_counter() - start > budget:
                record["skipped"].append(name)
                print(f"  {name}: skipped (budget {budget:.0f}s spent)", flush=True)
                continue
            model, inputs, out_of, layers = build(name, L)
            model = model.to(device=device, dtype=dtype)
            inputs = _to(inputs, device, dtype)
            runs = {"inductor": [], "aether": []}
            row = {"layers": layers}
            warm_dir = tempfile.mkdtemp(prefix=f"aether_ct_{name}_") if args.warm else None
            try:
                for backend in (("inductor", "aether") if warm_dir else ()):
                    measure(model, inputs, backend, device, allow_cpu, timer, warm_dir)
                for r in range(args.repeats):
                    order = ("inductor", "aether") if (i + r) % 2 == 0 else ("aether", "inductor")
                    outs, profiles = {}, {}
                    for backend in order:
                        prof = (cProfile.Profile() if args.profile_compile == name and r == 0
                                else None)
                        res = measure(model, inputs, backend, device, allow_cpu, timer,
                                      warm_dir, prof, sample=args.sample)
                        if prof is not None:
                            profiles[backend] = prof
                            record.setdefault("profile_compile", {})[backend] = {
                                "model": name, "by_cumtime": profile_top(prof, 40),
                                "by_tottime": profile_top(prof, 40, "tottime_s"),
                                "ours_by_cumtime": profile_top(prof, 40, ours=True),
                                "callers": profile_callers(prof)}
                        outs[backend] = out_of(res.pop("out"))
                        runs[backend].append(res)
                        print(f"  {name:<10} {backend:<8} compile {res['compile_s']:6.2f}s "
                              f"({res['compile_cpu_s']:6.2f} cpu-s)"
                              + (f"  (pass {res['pass_s']:.3f}s, "
                                 f"rewritten {res['aether'].get('rewritten', 0)}/{layers})"
                                 if backend == "aether" else ""), flush=True)
                    if len(profiles) == 2:  # [calls aether, calls inductor]
                        record["profile_compile"]["excess"] = profile_excess(
                            profiles["aether"], profiles["inductor"])
                    row.setdefault("max_abs_diff", float(
                        (outs["aether"].float() - outs["inductor"].float()).abs().max()))
                med = {b: statistics.median(x["compile_s"] for x in runs[b]) for b in runs}
                low = {b: min(x["compile_s"] for x in runs[b]) for b in runs}
                avg = {b: statistics.fmean(x["compile_s"] for x in runs[b]) for b in runs}
                cpu = {b: statistics.median(x["compile_cpu_s"] for x in runs[b]) for b in runs}
                row.update({
                    "inductor_s": med["inductor"], "aether_s": med["aether"],
                    "ratio": med["aether"] / med["inductor"],
                    "ratio_of_min": low["aether"] / low["inductor"],
                    "ratio_of_mean": avg["aether"] / avg["inductor"],
                    "inductor_cpu_s": cpu["inductor"], "aether_cpu_s": cpu["aether"],
                    "ratio_cpu": cpu["aether"] / cpu["inductor"],
                    "pass_s": statistics.median(x["pass_s"] for x in runs["aether"]),
                    "rewritten": runs["aether"][0]["aether"].get("rewritten", 0),
                    "aether_counters": runs["aether"][0]["aether"],
                    "graphs": {b: runs[b][0]["graphs"] for b in runs},
                    "runs": runs})
                row["pass_frac_of_aether"] = row["pass_s"] / row["aether_s"]
                ph_i, ph_a = runs["inductor"][0]["phases_s"], runs["aether"][0]["phases_s"]
                excess = {k: round(ph_a.get(k, 0.0) - ph_i.get(k, 0.0), 3)
                          for k in set(ph_a) | set(ph_i)}
                row["phase_excess_s"] = dict(sorted(excess.items(), key=lambda kv: -kv[1])[:15])
                if args.sample:
                    row["sampled_excess"] = sampled_excess(runs)
                    for r in runs["aether"] + runs["inductor"]:
                        del r["samples"]  # the excess is what is kept
                row["loadavg_end"] = loadavg()
                print(f"  {name:<10} ratio {row['ratio']:.3f} (inductor {med['inductor']:.2f}s, "
                      f"aether {med['aether']:.2f}s); of min {row['ratio_of_min']:.3f}; "
                      f"of mean {row['ratio_of_mean']:.3f}; "
                      f"cpu-seconds {row['ratio_cpu']:.3f}", flush=True)
            except Exception as e:  # noqa: BLE001  (recorded, the run goes on)
                row["error"] = f"{type(e).__name__}: {e}"
                print(f"  {name}: error {row['error']}", flush=True)
            record["models"][name] = row
            write_json(path, record)
    done = [r for r in record["models"].values() if "ratio" in r]
    ratios = [r["ratio"] for r in done]

    def geomean(xs):
        return math.exp(statistics.fmean(map(math.log, xs)))

    if ratios:
        tot_i = sum(r["inductor_s"] for r in record["models"].values() if "ratio" in r)
        tot_a = sum(r["aether_s"] for r in record["models"].values() if "ratio" in r)
        record["summary"] = {
            "models": len(ratios),
            "ratio_geomean": geomean(ratios),
            "ratio_median": statistics.median(ratios), "ratio_max": max(ratios),
            "ratio_of_min_geomean": geomean([r["ratio_of_min"] for r in done]),
            "ratio_of_min_max": max(r["ratio_of_min"] for r in done),
            "ratio_of_mean_geomean": geomean([r["ratio_of_mean"] for r in done]),
            "ratio_of_mean_max": max(r["ratio_of_mean"] for r in done),
            "ratio_cpu_geomean": geomean([r["ratio_cpu"] for r in done]),
            "ratio_cpu_max": max(r["ratio_cpu"] for r in done),
            "ratio_cpu_total": (sum(r["aether_cpu_s"] for r in done)
                                / sum(r["inductor_cpu_s"] for r in done)),
            "ratio_total": tot_a / tot_i, "inductor_total_s": tot_i, "aether_total_s": tot_a,
            "pass_total_s": sum(r["pass_s"] for r in record["models"].values() if "ratio" in r),
            "meets_target": max(ratios) <= TARGET_RATIO, "wall_s": time.perf_counter() - start,
            "loadavg_end": loadavg()}
    if timer.profiler is not None:
        record["profile_rewrite_attention"] = profile_top(timer.profiler)
    write_json(path, record)
    s = record["summary"]
    if s:
        print(f"summary: wall ratio geomean {s['ratio_geomean']:.3f}, max {s['ratio_max']:.3f}, "
              f"total {s['ratio_total']:.3f}; of min: geomean {s['ratio_of_min_geomean']:.3f}, "
              f"max {s['ratio_of_min_max']:.3f}; of mean: geomean {s['ratio_of_mean_geomean']:.3f}, "
              f"max {s['ratio_of_mean_max']:.3f}; cpu-seconds: geomean "
              f"{s['ratio_cpu_geomean']:.3f}, max {s['ratio_cpu_max']:.3f}, total "
              f"{s['ratio_cpu_total']:.3f} (target <= {TARGET_RATIO}); pass "
              f"{s['pass_total_s']:.2f}s of {s['aether_total_s']:.1f}s; wall {s['wall_s']:.0f}s",
              flush=True)
    print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
