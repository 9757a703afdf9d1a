"""Training convergence through the op: a GPT-2-style model trained for N steps on the synthetic
key-value recall task (aether_compile.training_task), once with default torch.compile (dense) and
once with backend="aether" (certified sparse attention, default eps), same seed and data.

    python benchmarks/train_convergence.py --steps 200 --out benchmarks/results

Writes train_convergence_<card>.json: both loss curves, recall accuracy, rewritten-site counts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, os.path.dirname(__file__))
from provenance import card_tag, env_record, write_json  # noqa: E402

from aether_compile.training_task import recall_batch  # noqa: E402


def train(backend: str, steps: int, seq_len: int, batch: int, device: str, options=None):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=128, n_layer=4, n_head=4,
                                  n_positions=seq_len, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0, attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch._dynamo.reset()
    counters.clear()
    compiled = (torch.compile(model) if backend == "inductor"
                else torch.compile(model, backend="aether", options=options or {}))
    losses, accs = [], []
    t0 = time.perf_counter()
    for step in range(steps):
        ids, labels = recall_batch(batch, seq_len, seed=step, device=device)
        out = compiled(input_ids=ids, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
        with torch.no_grad():
            pred = out.logits[:, :-1].argmax(-1)
            tgt = labels[:, 1:]
            sel = tgt != -100
            accs.append(float((pred[sel] == tgt[sel]).float().mean()))
        if step % 25 == 0:
            print(f"[{backend}] step {step} loss {losses[-1]:.4f} acc {accs[-1]:.3f}", flush=True)
    return {"losses": losses, "recall_acc": accs, "seconds": time.perf_counter() - t0,
            "sites": dict(counters["aether"])}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    options = {} if device == "cuda" else {"allow_cpu": True}
    # Training through the op is what this checks: at these lengths the pass would otherwise leave
    # CUDA attention dense ("short"). Read when the graphs are traced.
    os.environ.setdefault("AETHER_STATIC_DENSE", "0")
    dense = train("inductor", args.steps, args.seq_len, args.batch, device)
    sparse = train("aether", args.steps, args.seq_len, args.batch, device, options)
    last = slice(-50, None)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    summary = {
        "final50_loss_dense": mean(dense["losses"][last]),
        "final50_loss_aether": mean(sparse["losses"][last]),
        "final50_acc_dense": mean(dense["recall_acc"][last]),
        "final50_acc_aether": mean(sparse["recall_acc"][last]),
        "max_abs_loss_gap": max(abs(a - b) for a, b in zip(dense["losses"], sparse["losses"])),
        "aether_rewritten_sites": sparse["sites"].get("rewritten", 0),
    }
    record = {"env": env_record(), "config": vars(args), "summary": summary,
              "dense": dense, "aether": sparse}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"train_convergence_{card_tag(record['env'])}.json")
    write_json(path, record)
    print(json.dumps(summary, indent=1))
    print("->", path)


if __name__ == "__main__":
    main()
