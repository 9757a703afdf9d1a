"""Run the property checks of tests/kernels/test_properties.py outside pytest and count: cases run,
violations, crashes (per implementation path), plus the worst error / tolerance and dropped mass /
eps ratios seen. Writes JSON (merged by profile into the output file).

    TRITON_INTERPRET=1 python benchmarks/run_reliability.py --profile large \\
        --out benchmarks/results/reliability_cpu.json

Profiles give cases per path (``property_cases.PROFILE_CASES``): ci = op 200, Triton 30 per mode;
large = op 10,000, Triton 1,000 per mode. ``--op N --triton N`` override them.

Devices (``--device``, default env ``AETHER_TEST_DEVICE`` or cpu): on cpu the op is the plain-torch
reference and the Triton modes run through the interpreter (TRITON_INTERPRET=1); on cuda the same
cases (same seeds, inputs drawn on CPU and moved) run the op as users call it and the compiled
Triton kernels (TRITON_INTERPRET unset), and the default output is
benchmarks/results/reliability_<card>.json. The fuzz path always runs on CPU. The record's env
names the device, card, versions and commit.

    AETHER_COMMIT=<sha> python benchmarks/run_reliability.py --device cuda --profile large \\
        --budget-s 50

``--budget-s S`` stops each path after S seconds (on a GPU, Triton compiles a kernel for every new
shape/dtype/mask signature, so case rates vary); the record then counts the cases that ran and
says ``stopped_by_budget``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import torch
from hypothesis import HealthCheck, given, seed as hypothesis_seed, settings

# the repository root, as pytest has it: the cases import tests.helpers (tests/ itself must not
# go on sys.path: its aether_compile/ folder would shadow the package as a namespace)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from provenance import card_tag, env_record, write_json  # noqa: E402
from tests.property_cases import (DEVICES, PROFILE_CASES as PROFILES, cases, check_case,  # noqa: E402
                            device_from_env)


class BudgetSpent(Exception):
    """Raised by a case started after the path's time budget; ends the hypothesis run."""


def run_path(path: str, n: int, seed: int, log_every: int = 500, max_len=None,
             device: str = "cpu", budget_s: float | None = None) -> dict:
    """n random cases of one path (hypothesis-generated, never shrunk: every result is counted),
    on ``device``; cases that would start after ``budget_s`` seconds are not run."""
    counts = collections.Counter()
    failures = []
    worst = {"rel_err_over_tol": 0.0, "dropped_over_eps": 0.0}
    by_dtype = collections.Counter()
    t0 = time.time()

    @settings(max_examples=n, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck), phases=["generate"], print_blob=False)
    @hypothesis_seed(seed)
    @given(case=cases(path, max_len=max_len))
    def prop(case):
        if budget_s is not None and time.time() - t0 > budget_s:
            raise BudgetSpent  # hypothesis replays this case once more, then re-raises it
        res = check_case(case, path, device)
        counts["cases"] += 1
        by_dtype[str(case.dtype).split(".")[-1]] += 1
        counts["with_mask"] += case.mask_dtype is not None
        counts["causal"] += case.is_causal
        counts["pruned"] += res.kept_fraction < 1.0 and res.crash is None
        counts["zero_length"] += case.L == 0 or case.S == 0
        if res.crash is not None:
            counts["crashes"] += 1
        elif res.violations:
            counts["violations"] += 1
        else:
            for key in worst:
                worst[key] = max(worst[key], getattr(res, key))
        if not res.ok and len(failures) < 50:
            failures.append({"case": case.id(), "crash": res.crash, "violations": res.violations})
        if counts["cases"] % log_every == 0:
            print(f"  {path}: {counts['cases']} cases, {counts['violations']} violations, "
                  f"{counts['crashes']} crashes, {time.time() - t0:.0f}s", flush=True)

    stopped = False
    try:
        prop()
    except BudgetSpent:
        stopped = True
    return {"cases": counts["cases"], "device": device, "stopped_by_budget": stopped,
            "violations": counts["violations"],
            "crashes": counts["crashes"], "pruned_cases": counts["pruned"],
            "masked_cases": counts["with_mask"], "causal_cases": counts["causal"],
            "zero_length_cases": counts["zero_length"], "by_dtype": dict(by_dtype),
            "worst_rel_err_over_tol": worst["rel_err_over_tol"],
            "worst_dropped_over_eps": worst["dropped_over_eps"],
            "seconds": round(time.time() - t0, 1), "failures": failures}


def run_fuzz(n: int, seed: int, log_every: int = 100) -> dict:
    """n random attention-like modules through backend="aether" (tests/fuzz_modules.py)."""
    import logging
    import random

    from fuzz_modules import check_spec, random_spec

    logging.getLogger("aether_compile").setLevel(logging.ERROR)
    rng = random.Random(seed)
    outcomes, site_codes = collections.Counter(), collections.Counter()
    failures = []
    t0 = time.time()
    for i in range(n):
        r = check_spec(random_spec(rng))
        outcomes[r.outcome] += 1
        site_codes.update(r.codes)
        if r.outcome not in ("rewritten", "declined") and len(failures) < 50:
            failures.append({"module": r.spec.id(), "outcome": r.outcome, "codes": r.codes,
                             "detail": r.detail})
        if (i + 1) % log_every == 0:
            print(f"  fuzz: {i + 1} modules, {dict(outcomes)}, {time.time() - t0:.0f}s", flush=True)
    bad = n - outcomes["rewritten"] - outcomes["declined"]
    return {"cases": n, "device": "cpu", "crashes": outcomes["crash"] + outcomes["bad_decline"],
            "violations": outcomes["mismatch"] + outcomes["undetected"],
            "outcomes": dict(outcomes), "sites": sum(site_codes.values()),
            "sites_by_code": dict(site_codes.most_common()),
            "declines_by_reason": {k: v for k, v in site_codes.most_common() if k != "rewritten"},
            "not_ok": bad, "seconds": round(time.time() - t0, 1), "failures": failures}


def write(out: str, profile: str, record: dict) -> None:
    results = {}
    if os.path.exists(out):
        with open(out) as f:
            results = json.load(f)
    results[profile] = record
    write_json(out, results)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="ci")
    ap.add_argument("--op", type=int, help="op (CPU reference) cases; overrides the profile")
    ap.add_argument("--triton", type=int, help="cases per Triton mode; overrides the profile")
    ap.add_argument("--fuzz", type=int, help="random modules through the pass (path 'fuzz')")
    ap.add_argument("--paths", default="op,twopass,stop",
                    help="comma list of op, twopass, stop (property cases) and fuzz (the pass)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-len", type=int, help="longest L and S drawn (default: op 200, Triton 48)")
    ap.add_argument("--device", choices=DEVICES, default=None,
                    help="where the property cases run (default: env AETHER_TEST_DEVICE, else "
                         "cpu); fuzz always runs on CPU")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop each property path after this many seconds (counts what ran)")
    ap.add_argument("--out", default=None,
                    help="JSON file (default benchmarks/results/reliability_cpu.json, or "
                         "reliability_<card>.json on cuda)")
    args = ap.parse_args()
    try:
        device = args.device or device_from_env("cpu")
    except (ValueError, RuntimeError) as e:
        sys.exit(str(e))
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda needs a CUDA GPU")
    n = dict(PROFILES[args.profile])
    if args.op is not None:
        n["op"] = args.op
    if args.triton is not None:
        n["twopass"] = n["stop"] = args.triton
    if args.fuzz is not None:
        n["fuzz"] = args.fuzz
    paths = [p for p in args.paths.split(",") if p]
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if any(p in ("twopass", "stop") for p in paths):
        if device == "cpu" and not interpret:
            sys.exit("Triton paths on CPU need TRITON_INTERPRET=1 (or pass --device cuda, or "
                     "--paths op)")
        if device == "cuda" and interpret:
            sys.exit("--device cuda runs the compiled kernels: unset TRITON_INTERPRET")
    env = env_record(device)  # the code this process loaded; kept per path (runs may be merged)
    out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                   f"reliability_{card_tag(env)}.json")
    record = {"env": env, "cases_requested": {p: n[p] for p in paths}, "paths": {}}
    if os.path.exists(out):  # add to a profile's earlier record (e.g. --paths fuzz later)
        with open(out) as f:
            old = json.load(f).get(args.profile)
        old_env = (old or {}).get("env", {})
        if old and (old_env.get("device", "cpu"), old_env.get("card")) != (device,
                                                                           env.get("card")):
            print(f"{out}: the earlier {args.profile} record is from "
                  f"{old_env.get('card') or old_env.get('device')}; replacing it", flush=True)
        elif old:
            record["paths"] = {p: r for p, r in old["paths"].items() if p not in paths}
            record["cases_requested"] = {**old.get("cases_requested", {}),
                                         **record["cases_requested"]}
    print(f"device {device}" + (f" ({env['card']})" if device == "cuda" else "")
          + f", writing {out}", flush=True)
    for path in paths:
        print(f"{path}: {n[path]} cases", flush=True)
        if path == "fuzz":
            record["paths"][path] = r = run_fuzz(n[path], args.seed)
            print(f"fuzz: {r['cases']} modules, {r['outcomes']}, declines "
                  f"{r['declines_by_reason']}, {r['seconds']}s", flush=True)
        else:
            record["paths"][path] = r = run_path(path, n[path], args.seed, max_len=args.max_len,
                                                 device=device, budget_s=args.budget_s)
            print(f"{path} on {device}: cases {r['cases']}"
                  f"{' (budget spent)' if r['stopped_by_budget'] else ''}, violations "
                  f"{r['violations']}, crashes {r['crashes']}, pruned {r['pruned_cases']}, worst "
                  f"err/tol {r['worst_rel_err_over_tol']:.3f}, worst dropped/eps "
                  f"{r['worst_dropped_over_eps']:.3f}, {r['seconds']}s", flush=True)
        r["env"] = env
        record["total"] = {k: sum(r[k] for r in record["paths"].values())
                           for k in ("cases", "violations", "crashes")}
        write(out, args.profile, record)  # after every path: a long run keeps what it did
    print(json.dumps(record["total"]))
    return 0 if record["total"]["violations"] == record["total"]["crashes"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
