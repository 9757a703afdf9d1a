"""The end-to-end benchmark scripts run in --smoke mode (tiny sizes; CPU with allow_cpu) and write
the JSON the GPU runs will write: env (card, versions, commit), rows, summary keys of issue 6.
About 15-20 s each with a warm Inductor cache (a cold one adds ~15 s to the first)."""

import json
import os
import subprocess
import sys
import textwrap
import types

import pytest

from tests.helpers import REPO_ROOT as ROOT  # noqa: E402
from tests.helpers import TRITON_INTERPRET  # noqa: E402
BENCH = os.path.join(ROOT, "benchmarks")
ENV_KEYS = {"card", "torch", "triton", "transformers", "python", "commit", "date"}


def _run(script, *args, timeout=600):
    env = {**os.environ, "AETHER_COMMIT": "test-commit"}
    proc = subprocess.run([sys.executable, os.path.join(BENCH, script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _only_json(out_dir, prefix):
    files = [f for f in os.listdir(out_dir) if f.startswith(prefix) and f.endswith(".json")]
    assert len(files) == 1, files
    with open(os.path.join(out_dir, files[0])) as f:
        return json.load(f)


@pytest.mark.slow  # out of the CI budget: the runner imports in CI (below)
def test_e2e_llama_smoke(tmp_path):
    pytest.importorskip("transformers")
    out = _run("e2e_llama.py", "--smoke", "--out", str(tmp_path))
    assert "e2e_dense_ratio" in out
    rec = _only_json(tmp_path, "e2e_llama_smoke_")
    assert ENV_KEYS <= set(rec["env"]) and rec["env"]["commit"] == "test-commit"
    rows = rec["rows"]
    assert {r["attn"] for r in rows} == {"sdpa", "sdpa_nomask"}
    for r in rows:
        assert "error" not in r, r.get("traceback")
        assert r["counters_aether"]["rewritten"] == 2  # both layers
        assert all(s["decision"] == "sparse" for s in r["sites"])
        assert r["t_inductor_ms"] > 0 and r["t_aether_ms"] > 0
        assert r["max_abs_logits_diff_vs_inductor"] < 1e-4  # fp32 smoke model
    reasons = {r["attn"]: r["sites"][0]["reason"] for r in rows}
    assert "mask=causal" in reasons["sdpa_nomask"]
    s = rec["summary"]
    assert s["e2e_dense_ratio"] == pytest.approx(
        next(r for r in rows if r["attn"] == "sdpa")["e2e_dense_ratio"])


@pytest.mark.slow  # out of the CI budget: the runner imports in CI (below)
def test_train_stdlib_lm_smoke(tmp_path):
    out = _run("train_stdlib_lm.py", "--smoke", "--out", str(tmp_path))
    assert "e2e_sparse_speedup" in out
    rec = _only_json(tmp_path, "train_stdlib_lm_smoke_")
    assert ENV_KEYS - {"transformers"} <= set(rec["env"])
    assert rec["env"]["commit"] == "test-commit"
    assert rec["corpus"]["files"] > 100 and rec["corpus"]["val_bytes"] > 10_000
    assert rec["train"]["steps"] == 3 and len(rec["train_curve"]["loss_every_step"]) == 3
    ckpt = tmp_path / "stdlib_lm_smoke.pt"
    assert ckpt.exists()
    rows = rec["rows"]
    assert all("error" not in r for r in rows), [r.get("traceback") for r in rows]
    dense = [r for r in rows if r["backend"] == "dense"]
    sparse = [r for r in rows if r["backend"] == "aether"]
    assert len(dense) == 1 and len(sparse) == 2
    assert dense[0]["vs_fp32"]["rel"] > 0  # the bf16 noise the criterion uses
    for r in sparse:
        assert r["counters_aether"]["rewritten"] == 2
        assert len(r["kept_per_layer"]) == 2 and 0 < r["kept_fraction_of_causal"] <= 1
        assert isinstance(r["within_noise"], bool) and r["speedup"] > 0
    s = rec["summary"]
    assert {"e2e_sparse_speedup", "e2e_sparse_eps", "best_speedup_any_eps"} <= set(s)
    # the checkpoint loads back (no training, no evaluation)
    out_dir = tmp_path / "again"
    _run("train_stdlib_lm.py", "--smoke", "--eval-only", "--skip-eval", "--ckpt", str(ckpt),
         "--out", str(out_dir))
    rec2 = _only_json(out_dir, "train_stdlib_lm_smoke_")
    assert rec2["train"]["loaded_from"] == str(ckpt) and rec2["train"]["steps"] == 3


def _lm_module():
    sys.path.insert(0, BENCH)
    try:
        import train_stdlib_lm
    finally:
        sys.path.remove(BENCH)
    return train_stdlib_lm


def test_stdlib_split_is_deterministic():
    lm = _lm_module()
    _, rels = lm.stdlib_files()
    assert rels == sorted(rels) and "os.py" in rels
    assert not any("site-packages" in r for r in rels)
    a = lm.load_corpus()[2]
    b = lm.load_corpus()[2]
    assert a == b and 0 < a["files_val"] < a["files"] // 5


def test_sparse_summary_picks_best_within_noise():
    lm = _lm_module()

    def row(L, eps, speedup, within):
        return {"L": L, "backend": "aether", "eps": eps, "speedup": speedup,
                "within_noise": within, "err_over_noise": 1.0, "kept_fraction_of_causal": 0.5}

    rows = [{"L": 32768, "backend": "dense"}, row(16384, 1e-2, 9.0, True),
            row(32768, 1e-3, 1.5, True), row(32768, 1e-2, 2.0, True),
            row(32768, 1e-1, 3.0, False), {"L": 32768, "backend": "aether", "eps": 3e-2,
                                            "error": "OOM"}]
    s = lm.summarize(rows, [8192, 16384, 32768], 1.1)
    assert s["e2e_sparse_speedup"] == 2.0 and s["e2e_sparse_eps"] == 1e-2
    assert s["best_speedup_any_eps"] == 3.0 and s["rows_failed"] == 1
    assert lm.summarize([row(32768, 1e-1, 3.0, False)], [32768], 1.1)["e2e_sparse_speedup"] is None


@pytest.mark.slow  # out of the CI budget: the runner imports in CI (below)
def test_kernel_compile_time_for_an_h100_without_one(tmp_path):
    """benchmarks/kernel_compile_time.py compiles the kernels a compiled site asks for, for sm_90,
    on any machine (outside the interpreter: real Triton compiles, Triton's own ptxas), and
    records each stage; the traced pass is among them."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "TRITON_PTXAS_PATH")}
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "kernel_compile_time.py"),
                           "--out", str(tmp_path)], cwd=ROOT, env={**env, "AETHER_COMMIT": "t"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rec = _only_json(tmp_path, "kernel_compile_time_")
    assert rec["env"]["commit"] == "t" and rec["target"] == "cuda sm_90"
    passes = [r for r in rec["rows"] if r["traced_pass"]]
    assert [r["kernel"] for r in passes] == ["_attention_kernel"] * 2  # full and causal
    for r in rec["rows"]:
        assert r["wall_s"] > 0 and {"ttir", "ttgir", "llir", "ptx", "cubin"} <= set(r["stages_ms"])


def test_every_runner_imports_and_writes_one_record_shape(tmp_path):
    """Each runner in benchmarks/ imports on its own, as the GPU session runs it (a runner that
    imports only after another set up sys.path would pass in one process), and the one record
    writer gives the env every results JSON carries."""
    env = {**os.environ, "AETHER_COMMIT": "test-commit"}
    runners = sorted(f[:-3] for f in os.listdir(BENCH) if f.endswith(".py"))
    # One process (a process per runner took 40 s of CI on two cores), each runner imported as if
    # alone: sys.path as the GPU session has it, and no module of benchmarks/ left from the last.
    code = textwrap.dedent(f"""
        import importlib, json, os, sys, traceback
        sys.path.insert(0, 'benchmarks')
        base_path, failed = list(sys.path), {{}}
        for name in {runners!r}:
            sys.path[:] = base_path
            for mod in [m for m, v in sys.modules.items() if os.path.abspath(
                    getattr(v, '__file__', None) or '/').startswith(os.path.abspath('benchmarks'))]:
                del sys.modules[mod]
            try:
                importlib.import_module(name)
            except BaseException:
                failed[name] = traceback.format_exc()[-1500:]
        print(json.dumps(failed))
        """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    failed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(runners) > 10 and not failed, failed
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import provenance\n"
            "env = provenance.env_record()\n"
            f"provenance.write_json({str(tmp_path / 'r.json')!r}, {{'env': env}})")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "r.json").read_text())
    assert ENV_KEYS <= set(record["env"]) and record["env"]["commit"] == "test-commit"


def test_results_page_tables_are_generated_from_their_files(tmp_path, monkeypatch):
    """The results pages' marked tables equal what benchmarks/results_page.py renders from the
    result files they name; a changed number in a file changes its table."""
    monkeypatch.syspath_prepend(BENCH)
    import results_page

    assert results_page.main(["--check"]) == 0
    with open(results_page.PAGES[0]) as f:  # docs/results.md, the standing numbers
        page = f.read()
    assert len(results_page.MARKED.findall(page)) >= 3
    table = results_page.MARKED.search(page)
    with open(os.path.join(results_page.RESULTS, table.group(3))) as f:
        record = json.load(f)
    record["env"]["commit"] = "0000000"
    with open(tmp_path / table.group(3), "w") as f:
        json.dump(record, f)
    monkeypatch.setattr(results_page, "RESULTS", str(tmp_path))
    rendered = results_page.render(table.group(0))
    assert rendered != table.group(0) and "commit 0000000" in rendered


def test_decode_plot_is_drawn_from_its_results_file(tmp_path, monkeypatch):
    """docs/decode_step.svg is what benchmarks/plot_decode.py draws from the committed decode
    results (so it cannot drift from them): one stacked bar and one dense bar per row."""
    monkeypatch.syspath_prepend(BENCH)
    import xml.etree.ElementTree as ET

    import plot_decode

    out = tmp_path / "plot.svg"
    assert plot_decode.main(["--out", str(out)]) == 0
    with open(plot_decode.DEFAULT_OUT) as f:
        assert f.read() == out.read_text()
    with open(plot_decode.DEFAULT_JSON) as f:
        rows = plot_decode.rows_at(json.load(f), 1e-2)
    rects = [e for e in ET.parse(out).getroot() if e.tag.endswith("rect")]
    assert rows and len(rects) == 4 * len(rows) + 4  # three parts and dense per row; legend


def test_generate_keys_join_the_decode_summary(tmp_path, monkeypatch):
    """Issue 21's summary is one: bench_generate's keys (and their commit) land in the decode
    file of the same card, and nothing happens where either file is missing."""
    monkeypatch.syspath_prepend(BENCH)
    import bench_generate

    gen = {"env": {"commit": "g1"}, "summary": {"generate_tokens_per_s_ratio_32k": 1.5,
                                                "decode_tokens_match": True, "other": 3}}
    dec = {"env": {"commit": "d1"}, "rows": [], "summary": {"decode_speedup_32k_learned": 2.0}}
    assert bench_generate.attach_to_decode_summary(str(tmp_path), "CARD") is None  # no files
    (tmp_path / "generate_CARD.json").write_text(json.dumps(gen))
    bench_generate.attach_to_decode_summary(str(tmp_path), "CARD")  # no decode file: no-op
    assert not (tmp_path / "decode_CARD.json").exists()
    (tmp_path / "decode_CARD.json").write_text(json.dumps(dec))
    returned = bench_generate.attach_to_decode_summary(str(tmp_path), "CARD")
    summary = json.loads((tmp_path / "decode_CARD.json").read_text())["summary"]
    assert returned == summary
    assert summary["decode_speedup_32k_learned"] == 2.0
    assert summary["generate_tokens_per_s_ratio_32k"] == 1.5 and summary["decode_tokens_match"]
    assert summary["generate_commit"] == "g1" and "other" not in summary
    assert summary["generate_ratio_eps0"] is None  # named by the issue, absent from this run


def test_generate_summary_counts_only_certified_rows_and_noise_level_matches(monkeypatch):
    """The headline needs certified decode calls and equal tokens; the within-noise ratio also
    takes a row parting only at a near-tie with logits within the dense paths' own noise."""
    monkeypatch.syspath_prepend(BENCH)
    import bench_generate

    def row(eps, ratio, certified, match, near_tie=None, in_noise=None):
        return {"eps": eps, "ratio": ratio, "tokens_match": match, "near_tie": near_tie,
                "logits_within_noise": in_noise,
                "aether": {"decode_calls": {"certified": certified, "dense": 6}}}

    rows = [row(0.0, 0.9, 0, False, True, True),  # the ops' dense path: never the headline
            row(0.01, 1.2, 30, True, None, True),
            {**row(0.1, 1.5, 60, False, True, True), "step_ratio": 1.1},  # parts at a near-tie
            row(0.3, 2.0, 90, False, False, False),  # parts for real: neither
            {"eps": 0.5, "aether": {"error": "timeout"}}]
    # --graphs rows (aether under CUDA graphs, the default compile without): apart, never the
    # headline, however fast
    graphs = [{**row(0.01, 3.0, 30, True), "mode": "reduce-overhead", "dense_mode": "default"},
              {**row(0.1, 4.0, 60, False, False, False), "mode": "reduce-overhead",
               "dense_mode": "default"}]
    s = bench_generate.summarize(rows + graphs, have_noise=True)
    assert s["generate_ratio_cudagraphs"] == 3.0  # the 4.0 row parts for real
    assert s["generate_tokens_per_s_ratio_32k"] == 1.2 and s["generate_eps"] == 0.01
    assert s["generate_tokens_per_s_ratio_32k_within_noise"] == 1.5
    assert s["generate_eps_within_noise"] == 0.1 and s["generate_step_ratio_within_noise"] == 1.1
    assert s["generate_ratio_eps0"] == 0.9 and s["decode_certified_calls"] == 180
    assert s["decode_tokens_match"] is False and s["decode_logits_within_noise"] is False
    # what decode=True gives a user: the default rules' rows at eps > 0 with matching tokens
    # (here every row ran under them); rows with every site forced certified do not count
    assert s["generate_ratio_default_rules"] == 1.2
    forced = [{**row(0.01, 1.1, 0, True), "sites": "default"},
              {**row(0.01, 0.8, 30, True), "sites": "certified"}]
    split = bench_generate.summarize(forced, have_noise=True)
    assert split["generate_ratio_default_rules"] == 1.1
    assert split["generate_tokens_per_s_ratio_32k"] == 0.8  # the headline: certified calls
    dense_only = bench_generate.summarize(rows[:1], have_noise=True)
    assert dense_only["generate_ratio_default_rules"] is None
    assert dense_only["generate_tokens_per_s_ratio_32k"] is None
    assert dense_only["generate_ratio_cudagraphs"] is None
    assert dense_only["decode_tokens_match"] is None


def test_prefill_selection_study_counts_what_the_op_keeps(monkeypatch):
    """The study's ``ball`` selection is the op's: on sampled W2 tiles it keeps the blocks the
    reference forward keeps for those rows (same bound, order and stop rule); the oracle keeps
    no more, and the exact block maximum no more than the ball."""
    import torch

    monkeypatch.syspath_prepend(BENCH)
    monkeypatch.syspath_prepend(os.path.join(BENCH, "research"))
    import prefill_selection as study
    from aether_compile.kernels.reference import reference_attention
    from aether_compile.workloads import clustered_qkv

    N, tiles, eps = 4096, [0, 9, 20, 31], 1e-3
    q, k, v = clustered_qkv(1, 1, N, study.D, dtype=torch.float16, seed=0)
    q, k, v = q[0, 0].float(), k[0, 0].float(), v[0, 0].float()
    kept = study.study_head(q, k, tiles, eps)
    rows = torch.cat([torch.arange(t * study.BLOCK_M, (t + 1) * study.BLOCK_M) for t in tiles])
    _, _, ref_kept = reference_attention(q[rows][None, None], k[None, None], v[None, None],
                                         eps=eps, block_m=study.BLOCK_M, block_n=study.BLOCK_N)
    torch.testing.assert_close(kept["ball"], ref_kept[0, 0].float().mean(-1))
    assert (kept["oracle_row"] <= kept["oracle_tile"]).all()
    assert (kept["oracle_tile"] <= kept["ball"]).all() and (kept["ideal_tile"] <= kept["ball"]).all()
    assert (kept["ball"] < 1).any()  # something was skipped: the comparison means something


@pytest.mark.skipif(not TRITON_INTERPRET, reason="launches Triton kernels: needs TRITON_INTERPRET=1 on CPU")
def test_mask_stats_sweep_launches_equal_the_op(monkeypatch):
    """Every launch the sweep times (the op's bool kernel with its meta-parameters, the former
    per-entry kernel, each specialised and not) gives ``plan.mask_statistics``' block maxima and
    causal-difference counts: causal masks with partial tiles, a static cache's empty slots, and
    one flipped entry that must be counted."""
    import torch
    import triton

    from aether_compile.kernels import plan as kernel_plan

    monkeypatch.syspath_prepend(BENCH)
    import sweep_prefill_kernels as sweep

    bm, bn = sweep.BLOCK_M, sweep.BLOCK_N
    for B, L, S, flip in [(2, 200, 300, False), (1, 256, 1000, True), (1, 130, 1030, False)]:
        mask = (torch.arange(S)[None, :] <= torch.arange(L)[:, None]).expand(B, 1, L, S).contiguous()
        mask[..., S - 40:] = False  # the empty slots of a static cache
        if flip:
            mask[0, 0, 5, 700] = True
        nqt, nkb = triton.cdiv(L, bm), triton.cdiv(S, bn)
        want = kernel_plan.mask_statistics(mask, L, S, bm, bn)
        assert (want[1].sum() > 0) == (flip or L > S - 40)  # the count can tell a change
        assert torch.isinf(want[0]).any()  # some blocks are wholly masked
        for specialised in (True, False):
            launches = [lambda *a: sweep.mask_stats_per_entry(*a, kb=4, specialised=specialised),
                        lambda *a: sweep.mask_stats_op(*a, rows=16, kb=8, specialised=specialised)]
            for launch_stats in launches:
                got = torch.empty(B, 1, nqt, nkb), torch.zeros(B * nqt, dtype=torch.int32)
                launch_stats(mask, *got, L, S, nqt, nkb)
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_generate_ratio_against_the_faster_bracketing_dense_run(monkeypatch):
    """Rows are compared with the faster of the default-compile runs before and after them, so a
    slow first baseline cannot make aether look fast; the first run's ratio is kept beside it."""
    monkeypatch.syspath_prepend(BENCH)
    import bench_generate

    rows = [{"eps": 0.01, "ratio": 1.5, "aether": {"tokens_per_s": 150.0}},
            {"eps": 0.1, "aether": {"error": "timeout"}}]
    brk = bench_generate.bracket(rows, {"tokens_per_s": 100.0}, {"tokens_per_s": 125.0})
    assert rows[0]["ratio"] == 150.0 / 125.0 and rows[0]["ratio_first_dense"] == 1.5
    assert "ratio" not in rows[1]
    assert brk["after_over_before"] == 1.25 and brk["reference_tokens_per_s"] == 125.0
    slower_after = [{"eps": 0.01, "ratio": 1.5, "aether": {"tokens_per_s": 150.0}}]
    bench_generate.bracket(slower_after, {"tokens_per_s": 100.0}, {"tokens_per_s": 80.0})
    assert slower_after[0]["ratio"] == 1.5
    failed_after = [{"eps": 0.01, "ratio": 1.5, "aether": {"tokens_per_s": 150.0}}]
    brk = bench_generate.bracket(failed_after, {"tokens_per_s": 100.0}, {"error": "exit 1"})
    assert failed_after[0]["ratio"] == 1.5 and brk["after_tokens_per_s"] is None


def test_generate_splits_the_prompts_prefill_from_the_steps(monkeypatch):
    """``prefill_and_steps`` times one generate to its first new token (the prompt's prefill) and
    the mean step after it, on a small Llama on the CPU; ``split_ratios`` puts ours against the
    default compile's."""
    import torch
    transformers = pytest.importorskip("transformers")
    monkeypatch.syspath_prepend(BENCH)
    import bench_generate

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 24))
    clock = bench_generate.FirstTokenClock()
    tokens, logits, seconds = bench_generate.generate(model, ids, 5, streamer=clock)
    assert tokens.shape == (2, 5) and logits.shape == (5, 2, 64)
    assert clock.puts == 6  # the prompt, then each new token
    split = bench_generate.prefill_and_steps(model, ids, 5)
    assert 0 < split["prefill_s"] and 0 < split["step_ms"]

    # the split's arithmetic on a clock that generate advances: the prompt handed over at 0 s,
    # the first new token at 1 s (the prefill), then one token every 0.5 s
    now = [0.0]
    monkeypatch.setattr(bench_generate.time, "perf_counter", lambda: now[0])

    class Timed:
        def generate(self, ids, max_new_tokens, streamer=None, **kw):
            streamer.put(ids)
            for i in range(max_new_tokens):
                now[0] = 1.0 + 0.5 * i
                streamer.put(ids[:, :1])
            return types.SimpleNamespace(sequences=torch.zeros(2, 24 + max_new_tokens),
                                         scores=[torch.zeros(2, 64)] * max_new_tokens)
    assert bench_generate.prefill_and_steps(Timed(), ids, 5) == {"prefill_s": 1.0,
                                                                 "step_ms": 500.0}
    assert bench_generate.prefill_and_steps(model, ids, 1) == {"prefill_s": None, "step_ms": None}
    r = bench_generate.split_ratios({"prefill_s": 0.8, "step_ms": 4.0},
                                    {"prefill_s": 0.2, "step_ms": 5.0})
    assert r == {"prefill_ratio": 4.0, "step_ratio": 0.8}
    assert bench_generate.split_ratios({"prefill_s": None}, {"prefill_s": 0.2}) == {
        "prefill_ratio": None, "step_ratio": None}


def test_generate_table_names_rows_with_every_site_certified(monkeypatch):
    """bench_generate's rows forced certified (``--sites``) read as such on the results page;
    rows under the default rules (and older files without the key) as their eps alone."""
    monkeypatch.syspath_prepend(BENCH)
    import results_page

    dense = {"tokens_per_s": 100.0, "prefill_s": 1.0, "step_ms": 4.0}

    def row(sites=None):
        r = {"prompt": 32768, "mode": "default", "eps": 0.01, "dense": dense, "ratio": 1.0,
             "tokens_match": True, "aether": {**dense, "decode_calls": {"certified": 3}}}
        return r if sites is None else {**r, "sites": sites}

    record = {"env": {"card": "CARD", "torch": "t"}, "config": {"batch": 8, "new_tokens": 256},
              "rows": [row(), row("default"), row("certified")]}
    body = results_page.generate_table(record)[4:]
    assert [line.split(" | ")[2] for line in body] == ["0.01", "0.01",
                                                       "0.01, every site certified"]
