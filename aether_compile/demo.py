"""Demo: ``python -m aether_compile.demo``.

Main part: an unmodified transformers model (random init from a config, nothing downloaded)
compiled with ``backend="aether"``: the explain table of its attention sites, outputs against
eager, and eager vs compiled time. On CPU the sites stay dense with the CPU reason (pass
``--allow-cpu`` to rewrite them onto the op's reference) and the model still runs.

Then the op itself:
Runs certified block-sparse attention on clustered data (the shape of attention in which whole key
blocks are provably negligible) and prints the kept fraction, the certified bound, the measured
dropped mass and output error against float64, and the time against SDPA.
On CUDA: 32K tokens, Triton kernels, SDPA flash and cuDNN. On CPU: a small size, the reference.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import aether_compile
from aether_compile.kernels.reference import chunked_attention_fp64, dropped_mass
from aether_compile.workloads import clustered_qkv


def _time(fn, reps: int) -> float:
    """Median wall time in ms (device-synchronised)."""
    fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def run_op_demo(n: int, heads: int, dim: int, dtype: torch.dtype, device: str) -> None:
    q, k, v = clustered_qkv(1, heads, n, dim, dtype=dtype, device=device, seed=0)
    out, stats = aether_compile.attention(q, k, v, return_stats=True)
    ref = chunked_attention_fp64(q, k, v)
    err = float((out.double() - ref).norm() / ref.norm())
    sdpa_err = float((F.scaled_dot_product_attention(q, k, v).double() - ref).norm() / ref.norm())
    dropped = float(dropped_mass(q, k, stats.kept_blocks, stats.block_m, stats.block_n).max())
    print(f"clustered attention: B=1 H={heads} N={n} D={dim} {dtype} on {device}")
    print(f"  kept blocks      {stats.kept_fraction:.1%}  (tiles {stats.block_m}x{stats.block_n})")
    print(f"  certified bound  every row's dropped mass <= eps = {stats.eps:g}")
    print(f"  measured         max dropped mass {dropped:.2e}; output error vs float64 {err:.2e} "
          f"(SDPA in {dtype}: {sdpa_err:.2e})")
    reps = 10 if device == "cuda" else 3
    t_ours = _time(lambda: aether_compile.attention(q, k, v), reps)
    line = f"  time             aether {t_ours:.2f} ms"
    if device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION),
                              ("cuDNN", SDPBackend.CUDNN_ATTENTION)):
            try:
                with sdpa_kernel(backend):
                    t = _time(lambda: F.scaled_dot_product_attention(q, k, v), reps)
                line += f" | SDPA {name} {t:.2f} ms ({t / t_ours:.2f}x)"
            except RuntimeError as e:  # backend unavailable for these inputs
                line += f" | SDPA {name} n/a ({str(e).splitlines()[0][:40]})"
    else:
        t = _time(lambda: F.scaled_dot_product_attention(q, k, v), reps)
        line += f" | SDPA (CPU) {t:.2f} ms  [CPU runs the plain-torch reference]"
    print(line)


def _demo_model(seq: int, device: str, dtype: torch.dtype):
    """A Llama-style decoder (GQA, RoPE, causal + padding mask) from transformers, random init."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024,
                                   num_hidden_layers=4, num_attention_heads=8,
                                   num_key_value_heads=2, max_position_embeddings=max(seq, 128),
                                   use_cache=False, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(cfg).eval().to(device=device, dtype=dtype)
    ids = torch.randint(0, cfg.vocab_size, (2, seq), device=device)
    mask = torch.ones_like(ids)
    mask[1, : seq // 8] = 0  # left padding on the second row
    return model, dict(input_ids=ids, attention_mask=mask)


def run_model_demo(seq: int, device: str, dtype: torch.dtype, allow_cpu: bool) -> None:
    try:
        model, inputs = _demo_model(seq, device, dtype)
    except ImportError:
        print("transformers is not installed: skipping the model demo")
        return
    options = {"allow_cpu": allow_cpu}
    print(f"transformers LlamaForCausalLM (4 layers, GQA 8/2 heads), batch 2 x {seq} tokens, "
          f"{dtype} on {device}; torch.compile(model, backend=\"aether\", options={options})")
    with torch.no_grad():
        ref = model(**inputs).logits
        t0 = time.perf_counter()
        report = aether_compile.explain(model, **inputs, options=options)
        t_compile = time.perf_counter() - t0
        print(report)
        out = report.output.logits
        keep = inputs["attention_mask"].bool()  # padded query rows are not compared
        err = float((out.float() - ref.float())[keep].abs().max())
        scale = float(ref.float()[keep].abs().max())
        print(f"  outputs vs eager: max |diff| {err:.2e} (logits up to {scale:.2f}); "
              f"compile + first run {t_compile:.1f} s")
        reps = 10 if device == "cuda" else 3
        t_eager = _time(lambda: model(**inputs), reps)
        t_aether = _time(lambda: report.compiled(**inputs), reps)
    print(f"  time: eager {t_eager:.2f} ms | aether-compiled {t_aether:.2f} ms "
          f"({t_eager / t_aether:.2f}x)")
    print()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=None, help="sequence length (op demo)")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (model demo)")
    ap.add_argument("--allow-cpu", action="store_true",
                    help="on CPU, rewrite attention onto the op's reference implementation too")
    ap.add_argument("--skip-model", action="store_true", help="only the op demo")
    args = ap.parse_args(argv)
    if not args.skip_model:
        if torch.cuda.is_available():
            # Shorter CUDA attention than this (2 x 8 heads x 64 dims) stays dense in the pass:
            # dense is faster there ("short" in the report).
            run_model_demo(args.seq or 16384, "cuda", torch.float16, args.allow_cpu)
        else:
            run_model_demo(args.seq or 256, "cpu", torch.float32, args.allow_cpu)
    if torch.cuda.is_available():
        run_op_demo(args.n or 32768, 16, 128, torch.float16, "cuda")
    else:
        run_op_demo(args.n or 2048, 2, 64, torch.float32, "cpu")


if __name__ == "__main__":
    main()
