#!/usr/bin/env bash
# One device call per part (each fits the device's 10-minute limit); logs and JSON go to $OUT.
#   bash benchmarks/gpu_session.sh tests     # inductor integration + the model zoo
#   bash benchmarks/gpu_session.sh kernels   # kernel, backward and training GPU tests
#   bash benchmarks/gpu_session.sh first_contact  # the API, layout and README tests on this torch,
#                                             # the inductor and precompile GPU tests, the demo
#   bash benchmarks/gpu_session.sh bench     # the issue-6 suite (JSON kept if cut short)
#   bash benchmarks/gpu_session.sh w4        # issue-6 W4 alone (1M tokens), which the bench part cannot reach
#   bash benchmarks/gpu_session.sh compiled  # the op in compiled graphs; torch-plan issue-2 suite
#   bash benchmarks/gpu_session.sh e2e       # end-to-end Llama and the stdlib LM
#   bash benchmarks/gpu_session.sh reliability  # adversarial + property tests and the large profile on CUDA
#   bash benchmarks/gpu_session.sh diag      # stage profile, MiniLM on GPU, adversarial, compile time
#   bash benchmarks/gpu_session.sh compile   # compile-time ratios: cold forced sparse, cold default, warm
#   bash benchmarks/gpu_session.sh precompile  # precompile GPU tests; cold forced sparse: workers, threads, off
#                                             # (PRECOMPILE_MODES="1 0" picks which)
#   bash benchmarks/gpu_session.sh precompile_timeline  # 3 models, workers and threads: where the first call waits
#   bash benchmarks/gpu_session.sh firstcall  # precompile GPU tests; dense kernels' first calls; profiled
#                                             # cold compiles of bert+vit and whisper+gpt2
#   bash benchmarks/gpu_session.sh excess    # 3-repeat ratios of whisper, distilbert, nanogpt; profiled excess
#   bash benchmarks/gpu_session.sh final5    # compile-cost CPU tests on 2.11, GPU tests, recorded ratios
#   bash benchmarks/gpu_session.sh ratios    # recorded compile ratios: 8 models, cold, forced sparse, 3 repeats
#   bash benchmarks/gpu_session.sh sampled   # 3 models, 3 repeats, first call's stack sampled
#   bash benchmarks/gpu_session.sh verify5   # inductor + precompile GPU tests; default choices' ratios
#   bash benchmarks/gpu_session.sh early     # precompile GPU tests; 3-repeat ratios, early compile on/off
#   bash benchmarks/gpu_session.sh compiles   # the Triton compiles of cold first calls in this process
#   bash benchmarks/gpu_session.sh verify    # inductor + kernel GPU tests; compile time profiled, cold and warm
#   bash benchmarks/gpu_session.sh host      # host time of the runtime dense choice; e2e lag on/off
#   bash benchmarks/gpu_session.sh check     # short: inductor + kernel tests, warm compile, e2e no mask
#   bash benchmarks/gpu_session.sh dense     # the runtime dense choice, e2e Llama, a warm compile profiled
# Needs AETHER_COMMIT=<hash> (the device copy has no current .git) and the expecttest wheel in .whl/.
# The MiniLM GPU test needs .minilm/ (python benchmarks/pack_minilm.py; carry it): the package's
# 88 MB fp32 weights exceed the device's 64 MiB transfer, so it travels as fp16, the dtype the
# GPU test runs in anyway.
set -u
OUT=${OUT:-/tmp/aether_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
[ -d .minilm ] && export PYTHONPATH=$PYTHONPATH:$PWD/.minilm
# -v: each outcome is printed as it happens; SIGINT on timeout lets pytest still print its failures.
PYTEST="python3 -m pytest -v -m gpu -p no:cacheprovider -p no:logging -W ignore -rf --tb=short"
T="timeout -s INT -k 20"

case "${1:-tests}" in
  tests)
    $T 150 $PYTEST tests/test_inductor_gpu.py > "$OUT/inductor_gpu.txt" 2>&1
    AETHER_ZOO_RECORD="$OUT/zoo_gpu_record.json" $T 440 $PYTEST tests/test_rewrite_zoo.py > "$OUT/zoo_gpu.txt" 2>&1
    for f in inductor_gpu zoo_gpu; do echo "== $f"; grep -E "passed|failed|^FAILED|Error" "$OUT/$f.txt" | tail -25; done
    ;;
  first_contact)  # the user-facing surface on the GPU box's torch and transformers
    $T 170 python3 -m pytest -q -p no:cacheprovider -W ignore -rf --tb=short tests/test_layout.py \
      tests/test_readme.py tests/test_rewrite_api.py tests/test_transformers_attention.py \
      tests/test_state.py > "$OUT/api_tests.txt" 2>&1
    $T 220 $PYTEST tests/test_inductor_gpu.py tests/test_precompile.py > "$OUT/inductor_gpu.txt" 2>&1
    $T 150 python3 -m aether_compile.demo > "$OUT/demo_cuda.txt" 2>&1
    for f in api_tests inductor_gpu; do echo "== $f"; grep -E "passed|failed|^FAILED|Error" "$OUT/$f.txt" | tail -25; done
    echo "== demo"; tail -n 25 "$OUT/demo_cuda.txt"
    ;;
  kernels)
    $T 400 $PYTEST tests/test_gpu_attention.py tests/test_backward.py tests/test_training.py \
      > "$OUT/kernels_gpu.txt" 2>&1
    grep -E "passed|failed|^FAILED|Error" "$OUT/kernels_gpu.txt" | tail -25
    ;;
  bench)  # the issue-6 suite without W4 (about 540 s); W4 is its own part
    AETHER_BENCH_PARTIAL="$OUT/issue6_partial.json" timeout 575 python3 benchmarks/bench_attention.py \
      --suite issue6 --only uniform,clustered,llm_like --out "$OUT" > "$OUT/issue6.txt" 2>&1
    tail -n 30 "$OUT/issue6.txt"
    ;;
  w4)  # W4 alone (1M tokens, forward and backward, against flash): minutes of dense anchors
    timeout 560 python3 benchmarks/bench_attention.py --suite issue6 --only clustered_gqa --tag _w4 \
      --out "$OUT" > "$OUT/issue6_w4.txt" 2>&1
    tail -n 30 "$OUT/issue6_w4.txt"
    ;;
  compiled)  # the op inside compiled graphs (and CUDA graphs), and the torch-plan issue-2 suite
    timeout 200 python3 benchmarks/bench_compiled.py --out "$OUT" > "$OUT/compiled.txt" 2>&1
    AETHER_PLAN=torch timeout 150 python3 benchmarks/bench_attention.py --suite issue2 --out "$OUT/plan_torch" \
      > "$OUT/plan_torch.txt" 2>&1
    for f in compiled plan_torch; do echo "== $f"; tail -n 5 "$OUT/$f.txt"; done
    ;;
  e2e)
    timeout 150 python3 benchmarks/e2e_llama.py --out "$OUT" > "$OUT/e2e_llama.txt" 2>&1
    timeout 420 python3 benchmarks/train_stdlib_lm.py --minutes 2.5 --out "$OUT" > "$OUT/stdlib_lm.txt" 2>&1
    for f in e2e_llama stdlib_lm; do echo "== $f"; tail -n 8 "$OUT/$f.txt"; done
    ;;
  diag)  # stage profile, the MiniLM zoo test (needs .minilm), GPU adversarial/properties, compile time
    timeout 150 python3 benchmarks/profile_stages.py --out "$OUT" > "$OUT/profile.txt" 2>&1
    $T 100 $PYTEST tests/test_rewrite_zoo.py tests/test_gpu_attention.py -k "minilm or dense_dispatch" \
      > "$OUT/minilm_dense.txt" 2>&1
    $T 120 python3 -m pytest -q -p no:cacheprovider -W ignore -rfs --tb=short tests/test_adversarial.py \
      > "$OUT/adversarial_gpu.txt" 2>&1
    AETHER_TEST_DEVICE=cuda AETHER_STATIC_DENSE=0 $T 80 python3 -m pytest -q -p no:cacheprovider -W ignore \
      -rfs --tb=short tests/test_properties.py > "$OUT/properties_gpu.txt" 2>&1
    timeout 150 python3 benchmarks/compile_time.py --budget-s 120 --out "$OUT" > "$OUT/compile_time.txt" 2>&1
    for f in profile minilm_dense adversarial_gpu properties_gpu compile_time; do echo "== $f"; tail -n 6 "$OUT/$f.txt"; done
    ;;
  verify)  # after kernel changes: the GPU tests without the zoo, and where compile time goes
    $T 150 $PYTEST tests/test_inductor_gpu.py > "$OUT/inductor_gpu.txt" 2>&1
    $T 210 $PYTEST tests/test_gpu_attention.py tests/test_backward.py tests/test_training.py \
      > "$OUT/kernels_gpu.txt" 2>&1
    timeout 70 python3 benchmarks/compile_time.py --models gpt2 --profile-compile gpt2 \
      --out "$OUT/cold" > "$OUT/compile_time_cold.txt" 2>&1
    timeout 120 python3 benchmarks/compile_time.py --warm --models bert,gpt2,llama,vit --budget-s 80 \
      --out "$OUT/warm" > "$OUT/compile_time_warm.txt" 2>&1
    for f in inductor_gpu kernels_gpu; do echo "== $f"; grep -E "passed|failed|^FAILED|Error" "$OUT/$f.txt" | tail -25; done
    for f in compile_time_cold compile_time_warm; do echo "== $f"; grep -E "ratio|summary" "$OUT/$f.txt"; done
    ;;
  compile)  # issue 5's compile-time ratios: cold forced sparse (all models), cold with the default
            # choices (short sites stay dense), warm forced sparse
    timeout 230 python3 benchmarks/compile_time.py --budget-s 190 --out "$OUT" > "$OUT/compile_time.txt" 2>&1
    timeout 150 python3 benchmarks/compile_time.py --static-dense --budget-s 120 --tag _default \
      --out "$OUT" > "$OUT/compile_time_default.txt" 2>&1
    timeout 120 python3 benchmarks/compile_time.py --warm --models bert,gpt2,llama,vit --budget-s 80 \
      --tag _warm --out "$OUT" > "$OUT/compile_time_warm.txt" 2>&1
    for f in compile_time compile_time_default compile_time_warm; do echo "== $f"; grep -E "ratio|summary|error" "$OUT/$f.txt"; done
    ;;
  precompile)  # the prepare op's kernels compiled while tracing: Inductor's workers (default),
               # this process's threads, none; cold forced sparse, 8 models each, one run
    $T 200 $PYTEST tests/test_precompile.py > "$OUT/precompile_gpu.txt" 2>&1
    for how in ${PRECOMPILE_MODES:-1 threads 0}; do
      AETHER_PRECOMPILE=$how timeout 160 python3 benchmarks/compile_time.py --budget-s 140 \
        --tag "_precompile_$how" --out "$OUT" > "$OUT/compile_time_precompile_$how.txt" 2>&1
    done
    echo "== precompile_gpu"; grep -E "passed|failed|^FAILED|Error" "$OUT/precompile_gpu.txt" | tail -8
    for how in ${PRECOMPILE_MODES:-1 threads 0}; do echo "== AETHER_PRECOMPILE=$how"; grep -E "ratio |summary" "$OUT/compile_time_precompile_$how.txt"; done
    ;;
  precompile_timeline)  # the replay, the compile jobs and the first call's wait, per model
    $T 90 $PYTEST tests/test_precompile.py > "$OUT/precompile_gpu.txt" 2>&1
    echo "== precompile_gpu"; grep -E "passed|failed|^FAILED|Error" "$OUT/precompile_gpu.txt" | tail -8
    for how in 1 threads; do
      AETHER_PRECOMPILE=$how timeout 100 python3 benchmarks/compile_time.py --models bert,vit,gpt2 \
        --tag "_timeline_$how" --out "$OUT" > "$OUT/compile_time_timeline_$how.txt" 2>&1
      echo "== AETHER_PRECOMPILE=$how"; grep -E "ratio |summary" "$OUT/compile_time_timeline_$how.txt"
      python3 - "$OUT"/compile_time_*_timeline_$how.json <<'PY'
import json, sys
for name, row in json.load(open(sys.argv[1]))["models"].items():
    run = row["runs"]["aether"][0]
    print(name, "compile_inner", run["phases_s"].get("_compile.compile_inner"), "first", round(run["first_call_s"], 2))
    for t, event, detail in run["precompile"]:
        print(f"  {t:7.3f} {event} {detail if detail is not None else ''}")
PY
    done
    ;;
  firstcall)  # where a cold compile's excess goes once every Triton compile has finished
    $T 90 $PYTEST tests/test_precompile.py > "$OUT/precompile_gpu.txt" 2>&1
    echo "== precompile_gpu"; grep -E "passed|failed|^FAILED|Error" "$OUT/precompile_gpu.txt" | tail -8
    timeout 60 python3 benchmarks/probe_first_call.py --out "$OUT" > "$OUT/probe_first_call.txt" 2>&1
    echo "== probe_first_call"; cat "$OUT/probe_first_call.txt"
    timeout 120 python3 benchmarks/compile_time.py --models bert,vit --profile-compile vit \
      --tag _profile_vit --out "$OUT" > "$OUT/compile_time_profile_vit.txt" 2>&1
    timeout 120 python3 benchmarks/compile_time.py --models gpt2,whisper --profile-compile whisper \
      --tag _profile_whisper --out "$OUT" > "$OUT/compile_time_profile_whisper.txt" 2>&1
    for f in profile_vit profile_whisper; do echo "== $f"; grep -E "ratio |summary" "$OUT/compile_time_$f.txt"; done
    ;;
  final5)  # issue 5 at one commit: the CPU compile-cost tests on this torch (2.11), precompile and
           # inductor GPU tests, then the recorded ratios (the models nearest the target first)
    timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_compile_cost.py \
      > "$OUT/compile_cost.txt" 2>&1
    echo "== compile_cost"; tail -3 "$OUT/compile_cost.txt"
    $T 80 $PYTEST tests/test_precompile.py > "$OUT/precompile_gpu.txt" 2>&1
    echo "== precompile_gpu"; grep -E "passed|failed|^FAILED|Error" "$OUT/precompile_gpu.txt" | tail -8
    $T 170 $PYTEST tests/test_inductor_gpu.py > "$OUT/inductor_gpu.txt" 2>&1
    echo "== inductor_gpu"; grep -E "passed|failed|^FAILED|Error" "$OUT/inductor_gpu.txt" | tail -8
    timeout 290 python3 benchmarks/compile_time.py --repeats 3 --budget-s 250 \
      --models whisper,distilbert,nanogpt,bert,gpt2,vit,llama,qwen2 --out "$OUT" \
      > "$OUT/compile_time.txt" 2>&1
    grep -E "ratio |summary|error|skipped" "$OUT/compile_time.txt"
    ;;
  ratios)  # the recorded compile-time ratios: 8 models, cold, forced sparse, 3 repeats each
    timeout 560 python3 benchmarks/compile_time.py --repeats ${REPEATS:-3} --budget-s 470 \
      --out "$OUT" > "$OUT/compile_time.txt" 2>&1
    grep -E "ratio |summary|error|skipped" "$OUT/compile_time.txt"
    ;;
  sampled)  # the models over 1.2: 3 repeats with the first call's stack sampled (where the excess goes)
    timeout 400 python3 benchmarks/compile_time.py --models ${MODELS:-nanogpt,distilbert,whisper} \
      --repeats 3 --sample --tag _sampled --out "$OUT" > "$OUT/compile_time_sampled.txt" 2>&1
    grep -E "ratio |summary|error" "$OUT/compile_time_sampled.txt"
    ;;
  verify5)  # inductor + precompile GPU tests; default choices' compile ratios (1 repeat)
    $T 170 $PYTEST tests/test_inductor_gpu.py > "$OUT/inductor_gpu.txt" 2>&1
    echo "== inductor_gpu"; grep -E "passed|failed|^FAILED|Error" "$OUT/inductor_gpu.txt" | tail -8
    $T 100 $PYTEST tests/test_precompile.py > "$OUT/precompile_gpu.txt" 2>&1
    echo "== precompile_gpu"; grep -E "passed|failed|^FAILED|Error" "$OUT/precompile_gpu.txt" | tail -8
    timeout 200 python3 benchmarks/compile_time.py --static-dense --tag _default --out "$OUT" \
      > "$OUT/compile_time_default.txt" 2>&1
    grep -E "ratio |summary|error" "$OUT/compile_time_default.txt"
    ;;
  early)  # precompile GPU tests; 3-repeat ratios with our kernels' early compile on and off
    $T 150 $PYTEST tests/test_precompile.py > "$OUT/precompile_gpu.txt" 2>&1
    echo "== precompile_gpu"; grep -E "passed|failed|^FAILED|Error" "$OUT/precompile_gpu.txt" | tail -8
    for early in 1 0; do
      AETHER_EARLY_COMPILE=$early timeout 200 python3 benchmarks/compile_time.py \
        --models ${MODELS:-whisper,distilbert,nanogpt} --repeats 3 --tag _early$early --out "$OUT" \
        > "$OUT/compile_time_early$early.txt" 2>&1
      echo "== early $early"; grep -E "ratio |summary|error" "$OUT/compile_time_early$early.txt"
    done
    ;;
  excess)  # robust ratios (3 repeats) of the models over 1.2, and where each one's excess goes
    # (cProfile of both backends' first call, functions by aether-minus-inductor cumulative time)
    timeout 200 python3 benchmarks/compile_time.py --models ${MODELS:-whisper,distilbert,nanogpt} \
      --repeats 3 --tag _rep3 --out "$OUT" > "$OUT/compile_time_rep3.txt" 2>&1
    grep -E "ratio |summary|error" "$OUT/compile_time_rep3.txt"
    for m in ${PROFILE_MODELS:-whisper distilbert}; do
      timeout 120 python3 benchmarks/compile_time.py --models $m --profile-compile $m \
        --tag _excess_$m --out "$OUT" > "$OUT/compile_time_excess_$m.txt" 2>&1
      grep -E "ratio |error" "$OUT/compile_time_excess_$m.txt"
      python3 - "$OUT"/compile_time_*_excess_$m.json <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["profile_compile"]["excess"][:70]:
    print(f"  {r['excess_cum_s']:7.3f} {r['excess_own_s']:7.3f} {r['calls']} {r['function']}")
PY
    done
    ;;
  compiles)  # which Triton compiles a cold first call runs in this process, and why
    timeout 200 python3 benchmarks/compile_time.py --models ${MODELS:-bert,vit,gpt2,whisper} \
      --tag _compiles --out "$OUT" > "$OUT/compile_time_compiles.txt" 2>&1
    grep -E "ratio |summary|error" "$OUT/compile_time_compiles.txt"
    python3 - "$OUT"/compile_time_*_compiles.json <<'PY'
import json, sys
for name, row in json.load(open(sys.argv[1]))["models"].items():
    for backend, runs in row.get("runs", {}).items():
        run = runs[0]
        print(name, backend, "first", round(run["first_call_s"], 2), "inner",
              run["phases_s"].get("_compile.compile_inner"))
        for c in run.get("triton_compiles", []):
            print("   ", c)
        for t, event, detail in run.get("precompile", []):
            print(f"  {t:7.3f} {event} {detail if detail is not None else ''}")
PY
    ;;
  dense)  # the runtime dense choice (lagged in compiled graphs, GQA dense kernels), its end-to-end
         # effect, and a profile of a warm compile (where the rest of compile time goes)
    $T 150 $PYTEST tests/test_inductor_gpu.py > "$OUT/inductor_gpu.txt" 2>&1
    $T 120 $PYTEST tests/test_gpu_attention.py -k "gqa or dense_dispatch or eager_sample" \
      > "$OUT/dense_gpu.txt" 2>&1
    timeout 170 python3 benchmarks/e2e_llama.py --out "$OUT" > "$OUT/e2e_llama.txt" 2>&1
    timeout 100 python3 benchmarks/compile_time.py --warm --models gpt2 --profile-compile gpt2 \
      --tag _warm_profile --out "$OUT" > "$OUT/compile_time_warm_profile.txt" 2>&1
    for f in inductor_gpu dense_gpu; do echo "== $f"; grep -E "passed|failed|^FAILED|Error" "$OUT/$f.txt" | tail -25; done
    echo "== e2e_llama"; grep -E "interleaved|e2e_dense_ratio\"|error" "$OUT/e2e_llama.txt"
    echo "== compile_time_warm_profile"; grep -E "ratio|summary" "$OUT/compile_time_warm_profile.txt"
    ;;
  host)  # host time to issue the runtime dense choice; e2e Llama without a mask, lag on and off
    timeout 120 python3 benchmarks/profile_host.py --out "$OUT" > "$OUT/profile_host.txt" 2>&1
    timeout 100 python3 benchmarks/e2e_llama.py --attn sdpa_nomask --no-profile --out "$OUT/lag" \
      > "$OUT/e2e_lag.txt" 2>&1
    AETHER_DENSE_LAG=0 timeout 100 python3 benchmarks/e2e_llama.py --attn sdpa_nomask --no-profile \
      --out "$OUT/nolag" > "$OUT/e2e_nolag.txt" 2>&1
    cat "$OUT/profile_host.txt"; grep -h interleaved "$OUT/e2e_lag.txt" "$OUT/e2e_nolag.txt"
    ;;
  check)  # a short budget: inductor and kernel GPU tests, a warm compile, e2e without mask
    $T 130 $PYTEST tests/test_inductor_gpu.py > "$OUT/inductor_gpu.txt" 2>&1
    $T 120 $PYTEST tests/test_gpu_attention.py > "$OUT/kernels_gpu.txt" 2>&1
    timeout 75 python3 benchmarks/compile_time.py --warm --models gpt2,llama --budget-s 50 \
      --tag _warm_check --out "$OUT" > "$OUT/compile_time_warm_check.txt" 2>&1
    timeout 70 python3 benchmarks/e2e_llama.py --attn sdpa_nomask --no-profile --out "$OUT" \
      > "$OUT/e2e_llama.txt" 2>&1
    for f in inductor_gpu kernels_gpu; do echo "== $f"; grep -E "passed|failed|^FAILED|Error" "$OUT/$f.txt" | tail -25; done
    echo "== compile"; grep -E "ratio|summary" "$OUT/compile_time_warm_check.txt"
    echo "== e2e"; grep -E "interleaved" "$OUT/e2e_llama.txt"
    ;;
  reliability)
    timeout 200 python3 -m pytest -q -p no:cacheprovider -W ignore -rfs --tb=short tests/test_adversarial.py \
      > "$OUT/adversarial_gpu.txt" 2>&1
    AETHER_TEST_DEVICE=cuda AETHER_STATIC_DENSE=0 timeout 120 python3 -m pytest -q -p no:cacheprovider -W ignore \
      -rfs --tb=short tests/test_properties.py > "$OUT/properties_gpu.txt" 2>&1
    AETHER_STATIC_DENSE=0 timeout 240 python3 benchmarks/run_reliability.py --device cuda --profile large --budget-s 55 \
      --out "$OUT/reliability_NVIDIA_H100_80GB_HBM3.json" > "$OUT/reliability.txt" 2>&1
    for f in adversarial_gpu properties_gpu reliability; do echo "== $f"; tail -n 4 "$OUT/$f.txt"; done
    ;;
esac
