#!/usr/bin/env bash
# GPU work in parts, each one device call (inside the device's 10-minute limit); logs and JSON go
# to $OUT. Parts are named by what they run:
#   zoo                 the inductor GPU tests and the model zoo compiled on CUDA
#   api                 the API, layout and README tests on the device's torch; inductor and
#                       precompile GPU tests; the demo
#   kernels             kernel, backward and training GPU tests
#   after_move          behaviour unchanged after moving code: kernel, inductor, precompile and
#                       attn_implementation GPU tests, then the issue-6 suite
#   layout_tests        the GPU tests of after_move alone
#   train_long_lm       the GQA byte LM (8 query / 2 KV heads) trained at 16K context, for decode
#                       (issue 21): bf16 weights in parts of at most 15 MiB (TRAIN_MIN minutes)
#   decode              the decode-step benchmark (uniform, clustered, learned with CKPT)
#   decode_sweep        the decode kernel tests on CUDA, then decode (CKPT) with the kernels'
#                       meta-parameter sweep
#   decode_generate     decode tests, a short decode run with the sweep, generate: one call (CKPT)
#   decode_fresh        train_long_lm, then decode with its weights, in one call
#   generate_split      a fresh machine: train_long_lm, then profile_generate with its weights (the
#                       prompt's prefill apart from the steps; aether with decode=False profiled)
#   generate_profile_b8 generate's prefill and steps split and profiled at batch 8, 32K (CKPT;
#                       without it the long LM untrained, TRAIN=1 trains it first)
#   prefill_ws          the warp-specialized visit loops and TMA loads: their GPU tests, then the
#                       pass's variants and Flex on the same blocks at 128K and 32K (issue 22)
#   generate_graphs_short the default compile against aether under CUDA graphs, split (CKPT)
#   first_call          a session's first call: the GPU tests not yet run (decode under CUDA
#                       graphs, the warp-specialized and TMA loops), the generate step profiled
#                       (untrained LM; eps 0's exact op split too), the dense decode routes at
#                       its shape
#   generate            transformers generate with a static cache, default compile vs aether (CKPT)
#   suite               the issue-6 suite (W1 uniform, W2 clustered, W3 LLM-like)
#   suite_w4            issue-6 W4 alone (1M tokens), which the suite cannot reach in time
#   compiled            the op in compiled graphs; the issue-2 suite with the torch-op plan
#   e2e                 end-to-end Llama and the stdlib LM
#   reliability         adversarial and property tests on CUDA, the large reliability profile
#   profile             per-kernel GPU time of one call; MiniLM on CUDA
#   prefill_costs       the attention GPU tests (a static cache's prefill mask among them),
#                       the profile of W2 and of that mask, the plan kernels' sweeps (issue 22)
#   issue22             prefill GPU tests, the suite's W1 and W2, the eager dense choice's cost
#   sweeps              GPU tests of the public eager call, dense policy and HF eager models;
#                       the decode dense path's and the prefill pass's meta-parameter sweeps
#   decode_grid_steps   GPU tests of the decode op's masked routes and HF eager models; the decode
#                       grid (CKPT) with the size threshold and masked routes; the masked dense
#                       paths' defaults
#   prefill_unmasked    GPU tests of dynamic lengths across tiles (one graph) and the pass; the
#                       pass's variants at 128K and 32K (key steps, probe/recert, Flex on the
#                       same blocks; 32K on 128-key blocks too); the issue-6 suite's W2
#                       (SUITE_ONLY=uniform,clustered adds W1). Named for the unmasked variant
#                       it first measured (5c1f3a2), since removed
#   w2_no_kept_map      GPU tests of eager inference without the kept map and of dynamic lengths;
#                       the issue-6 suite's W2 at 32K and 128K (tag _w2_inference)
#   generate_b8         generate at batch 8, 32K (CKPT=.ckpt/long_lm.pt, carried): three timed calls
#                       a configuration, the default compile before and after the aether rows
#   row_tails           GPU tests of re-certification with row tails; W2 at 32K and 128K (tag
#                       _w2_row_tails); the pass's re-certification variants at 128K and 32K (row
#                       tails on and off)
#   row_tails_sweep     the pass at 128K and 64K over the row tails' anchor and scan chunk, against
#                       the tile's tail and no re-certification
#   generate_b8_fresh   a fresh machine: train_long_lm, generate at batch 8 and 32K with its weights
#                       (three timed calls a configuration; the default compile before and after)
#   prefill_head        GPU tests of eager inference, row tails and dynamic lengths; the suite's W2
#                       at 32K and 128K (tag _w2_head); the row tails' sweep at 128K
#   compile_time        the recorded compile-time ratios: 8 models, cold, forced sparse, 3 repeats
#   compile_time_modes  cold forced sparse, cold default choices, warm (one run each)
#   precompile          precompile GPU tests; cold compiles with Inductor's workers, threads, off
#                       (PRECOMPILE_MODES="1 0" picks which)
# Needs AETHER_COMMIT=<hash> (the device copy has no current .git) and the expecttest wheel in .whl/.
# The MiniLM GPU test needs .minilm/ (python benchmarks/pack_minilm.py; carry it): the package's
# 88 MB fp32 weights exceed the device's 64 MiB transfer, so it travels as fp16, the dtype the
# GPU test runs in anyway.
# bench_generate's eps > 0 rows run every decode site certified (GENERATE_SITES=both adds the
# default rules' rows): at the long LM's shapes the default rules compile those sites exact
# (dense_policy.decode_exact_reason), the eps-0 row's route, so certified rows are the ones
# that time something else.
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

generate_split() {  # profile_generate at batch 8, 32K (CKPT), prefill and step apart:
                   # generate_split TAG SECONDS "BACKENDS" EPS [--profile BACKENDS...]
  timeout "$2" python3 benchmarks/profile_generate.py --ckpt "$CKPT" --length 32768 --batch 8 \
    --steps 32 --backends $3 --eps "$4" "${@:5}" --tag "_b8_$1" --out "$OUT" \
    > "$OUT/profile_generate_$1.txt" 2>&1
  echo "== $1 (rc $?)"; grep -E "^(inductor|aether)" "$OUT/profile_generate_$1.txt"
}

w2_suite() {  # the issue-6 suite's W2 at 32K and 128K: w2_suite TAG SECONDS
  AETHER_BENCH_PARTIAL="$OUT/issue6_partial.json" timeout "$2" python3 benchmarks/bench_attention.py \
    --suite issue6 --only clustered --sizes 32768,131072 --tag "$1" --out "$OUT" > "$OUT/issue6.txt" 2>&1
  tail -n 14 "$OUT/issue6.txt"
}

case "${1:-zoo}" in
  zoo)  # the inductor GPU tests and the model zoo on CUDA
    $T 150 $PYTEST tests/aether_compile/test_inductor_gpu.py > "$OUT/inductor_gpu.txt" 2>&1
    AETHER_ZOO_RECORD="$OUT/zoo_gpu_record.json" $T 440 $PYTEST tests/passes/test_rewrite_zoo.py > "$OUT/zoo_gpu.txt" 2>&1
    for f in inductor_gpu zoo_gpu; do echo "== $f"; grep -E "passed|failed|^FAILED|Error" "$OUT/$f.txt" | tail -25; done
    ;;
  api)  # the user-facing surface on the device's torch and transformers; the demo
    $T 170 python3 -m pytest -q -p no:cacheprovider -W ignore -rf --tb=short tests/test_layout.py \
      tests/test_readme.py tests/aether_compile/test_rewrite_api.py tests/aether_compile/test_transformers_attention.py \
      tests/aether_compile/test_state.py > "$OUT/api_tests.txt" 2>&1
    $T 220 $PYTEST tests/aether_compile/test_inductor_gpu.py tests/aether_compile/test_precompile.py > "$OUT/inductor_gpu.txt" 2>&1
    $T 150 python3 -m aether_compile.demo > "$OUT/demo_cuda.txt" 2>&1
    for f in api_tests inductor_gpu; do echo "== $f"; grep -E "passed|failed|^FAILED|Error" "$OUT/$f.txt" | tail -25; done
    echo "== demo"; tail -n 25 "$OUT/demo_cuda.txt"
    ;;
  kernels)
    $T 400 $PYTEST tests/kernels/test_gpu_attention.py tests/kernels/test_backward.py tests/aether_compile/test_training.py \
      > "$OUT/kernels_gpu.txt" 2>&1
    grep -E "passed|failed|^FAILED|Error" "$OUT/kernels_gpu.txt" | tail -25
    ;;
  after_move|layout_tests)  # behaviour unchanged after moving code: the GPU tests that cover every kernel path, the
    # Inductor integration and attn_implementation, then the issue-6 suite (compare its JSON)
    $T 250 $PYTEST tests/kernels/test_gpu_attention.py tests/kernels/test_backward.py tests/aether_compile/test_inductor_gpu.py \
      tests/aether_compile/test_precompile.py tests/aether_compile/test_transformers_attention.py > "$OUT/layout_gpu.txt" 2>&1
    grep -E "passed|failed|^FAILED|Error" "$OUT/layout_gpu.txt" | tail -25
    [ "$1" = layout_tests ] && exit 0
    AETHER_BENCH_PARTIAL="$OUT/issue6_partial.json" timeout 200 python3 benchmarks/bench_attention.py \
      --suite issue6 --only uniform,clustered,llm_like --out "$OUT" > "$OUT/issue6.txt" 2>&1
    tail -n 14 "$OUT/issue6.txt"
    ;;
  train_long_lm)  # a learned long-context model for the decode benchmarks and bound research
    timeout 420 python3 benchmarks/train_stdlib_lm.py --train-len 16384 --batch 2 --kv-heads 2 --mlp swiglu \
      --minutes "${TRAIN_MIN:-3}" --skip-eval --ckpt "$OUT/long_lm.pt" --ckpt-shard-mib 15 \
      --out "$OUT" > "$OUT/train_long_lm.txt" 2>&1
    tail -n 8 "$OUT/train_long_lm.txt"
    ;;
  decode)  # issue 21's attention-step rows; CKPT: the long LM's weights (parts), else no learned rows
    timeout "${DECODE_S:-560}" python3 benchmarks/bench_decode.py ${CKPT:+--ckpt "$CKPT"} --flex \
      --deadline-min "${DECODE_MIN:-8.5}" --out "$OUT" > "$OUT/bench_decode.txt" 2>&1
    tail -n 40 "$OUT/bench_decode.txt"
    ;;
  decode_sweep)  # the decode kernel tests on CUDA, then the decode rows (learned first) with the
                 # kernels' meta-parameter sweep at 32K keys, batch 8 (CKPT: the long LM's weights)
    $T 110 $PYTEST -m "" tests/kernels/test_decode.py -q > "$OUT/decode_gpu_tests.txt" 2>&1
    tail -n 3 "$OUT/decode_gpu_tests.txt"
    timeout 420 python3 benchmarks/bench_decode.py --ckpt "$CKPT" --flex --sweep \
      --kinds learned uniform clustered --deadline-min 6.2 --out "$OUT" > "$OUT/bench_decode.txt" 2>&1
    tail -n 45 "$OUT/bench_decode.txt"
    ;;
  decode_generate)  # one call for both when device time is short: the decode kernels' soundness
                    # tests on CUDA, the decode rows (learned with the sweep, uniform; 8K and 32K,
                    # batch 1 and 8), then generate (default compile, eager, eps 0 and 0.01)
    $T 60 $PYTEST -m "" -x tests/kernels/test_decode.py -q -k "bounds or dropped or fused or combine" \
      > "$OUT/decode_gpu_tests.txt" 2>&1
    tail -n 2 "$OUT/decode_gpu_tests.txt"
    timeout 200 python3 benchmarks/bench_decode.py --ckpt "$CKPT" --sweep --kv 8192 32768 \
      --batch 1 8 --kinds learned uniform --deadline-min 2.7 --out "$OUT" > "$OUT/bench_decode.txt" 2>&1
    grep -E "kind|learned|uniform|sweep|per layer|decode_" "$OUT/bench_decode.txt" | tail -n 24
    timeout 230 python3 benchmarks/bench_generate.py \
      --sites ${GENERATE_SITES:-certified} --ckpt "$CKPT" --mode default --eps 0 0.01 \
      --row-timeout-s 75 --out "$OUT" > "$OUT/bench_generate.txt" 2>&1
    tail -n 5 "$OUT/bench_generate.txt"
    ;;
  decode_fresh)  # a fresh machine has no checkpoint: train the long LM (2 min), then the decode
                 # rows with it (about 5 min); the weights come back in $OUT for generate's call
    TRAIN_MIN=${TRAIN_MIN:-2} bash "$0" train_long_lm
    timeout 390 python3 benchmarks/bench_decode.py --ckpt "$OUT/long_lm.pt" --flex \
      --kinds learned uniform clustered --deadline-min 5.4 --out "$OUT" > "$OUT/bench_decode.txt" 2>&1
    tail -n 30 "$OUT/bench_decode.txt"
    ;;
  generate_split)  # where a compiled generate's time goes (a fresh machine trains the LM first):
                   # the static cache's prefill mask should now go dense (560ca5b), and the
                   # profile of aether with decode=False shows the decode step's unexplained 2 ms
    # CKPT (the long LM's weights carried in parts) skips the 2 minutes of training
    [ -z "${CKPT:-}" ] && TRAIN_MIN=${TRAIN_MIN:-2} bash "$0" train_long_lm
    timeout 300 python3 benchmarks/profile_generate.py --ckpt "${CKPT:-$OUT/long_lm.pt}" --length 32768 \
      --batch 4 --steps 32 --profile aether_prefill --out "$OUT" > "$OUT/profile_generate.txt" 2>&1
    tail -n 20 "$OUT/profile_generate.txt"
    ;;
  generate_profile_b8)  # generate at batch 8, 32K (CKPT): the GPU test of generate under CUDA
                       # graphs; the prompt's prefill and the steps split, the default compile
                       # against aether (eps 1e-2) profiled per op in the default mode; aether
                       # with Inductor's CUDA graphs (its decode ops run between graphs) at eps
                       # 1e-2; with GRAPHS_BASELINE=1 last the default compile with
                       # reduce-overhead (it crashed at 922ec31 on torch 2.11). Without CKPT,
                       # the long LM untrained (host time and launches are the same where every
                       # decode call goes dense, as at eps 1e-2); TRAIN=1 trains it first
    if [ -n "${TRAIN:-}" ]; then
      TRAIN_MIN=${TRAIN_MIN:-2} bash "$0" train_long_lm; CKPT=$OUT/long_lm.pt
    fi
    CKPT=${CKPT:-untrained}
    $T ${TEST_S:-90} $PYTEST -m "" tests/passes/test_rewrite_decode.py tests/aether_compile/test_kv_cache.py \
      -k "cuda_graphs" > "$OUT/gpu_tests.txt" 2>&1
    grep -E "passed|failed|^FAILED|Error" "$OUT/gpu_tests.txt" | tail -8
    generate_split default_eps0.01 ${SPLIT_S:-170} "inductor aether" 0.01 --profile inductor aether
    [ -z "${DEFAULT_ONLY:-}" ] && generate_split cudagraphs_eps0.01 110 aether_cudagraphs 0.01 \
      --profile aether_cudagraphs
    [ -n "${GRAPHS_BASELINE:-}" ] && generate_split inductor_cudagraphs 80 inductor_cudagraphs 0 --profile
    ;;
  first_call)  # the most this repository's open work learns from one call (about 480 s): the
              # GPU tests nothing has run yet (decode under CUDA graphs, warp-specialized and
              # TMA visit loops), the default-mode generate step profiled against the default
              # compile (the long LM untrained, every decode call dense) and split at eps 0
              # (the exact op), then the dense decode routes at its shape. prefill_ws next
    $T ${TEST_S:-150} $PYTEST -m "" tests/passes/test_rewrite_decode.py tests/aether_compile/test_kv_cache.py \
      tests/kernels/test_forward.py -k "cuda_graphs or warp_specialized or recertifying or too_small_to_pay" \
      > "$OUT/gpu_tests.txt" 2>&1
    grep -E "passed|failed|^FAILED|Error" "$OUT/gpu_tests.txt" | tail -8
    CKPT=${CKPT:-untrained} generate_split default_eps0.01 ${SPLIT_S:-240} \
      "inductor aether aether_exact" 0.01 --profile inductor aether
    # the dense decode routes at the long LM's shape (8 query / 2 KV heads, D 64, the static
    # cache's 32K + 256 slots): which SDPA kernel the mask with GQA gets, against attend_all and
    # against the default compile's repeat_kv and SDPA
    timeout 90 python3 benchmarks/sweep_decode_dense.py --quick --no-clustered --heads 8 2 64 \
      --shapes 8x33024 1x33024 --out "$OUT" > "$OUT/sweep_decode_dense_lm.txt" 2>&1
    grep -E "^B[0-9]|Error" "$OUT/sweep_decode_dense_lm.txt" | cut -c1-400
    ;;
  exact_sdpa)  # after first_call (fe46cc8): the exact route as SDPA on the cache against the
              # default compile and certified sites (untrained LM); the decode CUDA-graph tests
              # (one segfaulted in Inductor's static launcher on 2.11: without it here) apart
              # from the forward loops' tests; the pass's variants and Flex at 32K
    # aether at eps 1e-2: exact since the host-time rule (dense_policy.decode_exact_reason), the
    # same route as eps 0; aether_certified: its sites certified as before the rule
    CKPT=${CKPT:-untrained} generate_split exact_sdpa ${SPLIT_S:-150} \
      "inductor aether aether_certified" 0.01
    TORCHINDUCTOR_USE_STATIC_CUDA_LAUNCHER=0 $T ${TEST_S:-130} $PYTEST -m "" tests/passes/test_rewrite_decode.py \
      -k "cuda_graphs or too_small_to_pay" > "$OUT/gpu_tests_decode.txt" 2>&1
    $T ${FORWARD_S:-100} $PYTEST -m "" tests/kernels/test_forward.py -k "warp_specialized or recertifying" \
      > "$OUT/gpu_tests_forward.txt" 2>&1
    for f in gpu_tests_decode gpu_tests_forward; do
      echo "== $f"; grep -E "passed|failed|^FAILED|Error|Segmentation" "$OUT/$f.txt" | tail -6; done
    [ "${PREFILL_S:-170}" = 0 ] ||  # PREFILL_S=0: without the prefill variants
      LENGTHS=${LENGTHS:-32768} PREFILL_S=${PREFILL_S:-170} SKIP_TESTS=1 bash "$0" prefill_ws
    ;;
  generate_graphs_short)  # little device time: the default compile (default mode) and aether
                         # under Inductor's CUDA graphs (eps 1e-2) at batch 8, 32K (CKPT),
                         # prefill and step apart; its decode_calls count the decode op's
                         # Python running at every step of a replayed generate
    generate_split graphs_eps0.01 ${SPLIT_S:-170} "inductor aether_cudagraphs" 0.01 --profile
    ;;
  generate)  # end-to-end greedy generation on the long LM as a LlamaForCausalLM (CKPT needed)
    # --mode default: reduce-overhead's default-compile baseline segfaults on torch 2.11 with
    # transformers 5.17 (logs/decode_8b7d79d); bench_generate tries it first when asked
    # rows: the default compile, eager (the dense reference's own noise), aether at eps 0 (its
    # dense path alone), 0.01 and 0.1; each in its own process, about a minute each
    timeout "${GENERATE_S:-560}" python3 benchmarks/bench_generate.py \
      --sites ${GENERATE_SITES:-certified} --ckpt "$CKPT" \
      --mode ${GENERATE_MODE:-default} --row-timeout-s 100 --out "$OUT" > "$OUT/bench_generate.txt" 2>&1
    tail -n 12 "$OUT/bench_generate.txt"
    ;;
  suite)  # the issue-6 suite without W4 (about 180-540 s); W4 is suite_w4
    AETHER_BENCH_PARTIAL="$OUT/issue6_partial.json" timeout 575 python3 benchmarks/bench_attention.py \
      --suite issue6 --only uniform,clustered,llm_like --out "$OUT" > "$OUT/issue6.txt" 2>&1
    tail -n 30 "$OUT/issue6.txt"
    ;;
  suite_w4)  # W4 alone (1M tokens, forward and backward, against flash): minutes of dense anchors
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
  reliability)
    timeout 200 python3 -m pytest -q -p no:cacheprovider -W ignore -rfs --tb=short tests/kernels/test_adversarial.py \
      > "$OUT/adversarial_gpu.txt" 2>&1
    AETHER_TEST_DEVICE=cuda AETHER_STATIC_DENSE=0 timeout 120 python3 -m pytest -q -p no:cacheprovider -W ignore \
      -rfs --tb=short tests/kernels/test_properties.py > "$OUT/properties_gpu.txt" 2>&1
    AETHER_STATIC_DENSE=0 timeout 240 python3 benchmarks/run_reliability.py --device cuda --profile large --budget-s 55 \
      --out "$OUT/reliability_NVIDIA_H100_80GB_HBM3.json" > "$OUT/reliability.txt" 2>&1
    for f in adversarial_gpu properties_gpu reliability; do echo "== $f"; tail -n 4 "$OUT/$f.txt"; done
    ;;
  profile)  # per-kernel GPU time of one call (where a call's time goes), MiniLM on CUDA
    timeout 150 python3 benchmarks/profile_stages.py --out "$OUT" > "$OUT/profile.txt" 2>&1
    $T 100 $PYTEST tests/passes/test_rewrite_zoo.py -k minilm > "$OUT/minilm.txt" 2>&1
    for f in profile minilm; do echo "== $f"; tail -n 6 "$OUT/$f.txt"; done
    ;;
  prefill_costs)  # issue 22: where W2's plan and a static cache's prefill mask spend their time
    $T 200 $PYTEST tests/kernels/test_gpu_attention.py tests/aether_compile/test_dense_policy.py \
      > "$OUT/dense_tests.txt" 2>&1
    timeout 200 python3 benchmarks/profile_stages.py --only clustered run_static_cache_prefill \
      --out "$OUT" > "$OUT/profile.txt" 2>&1
    timeout 200 python3 benchmarks/sweep_prefill_kernels.py --out "$OUT" > "$OUT/sweep.txt" 2>&1
    for f in dense_tests profile sweep; do echo "== $f"; tail -n 8 "$OUT/$f.txt"; done
    ;;
  issue22)  # issue 22: the public function's dense choice before the op, 128-key blocks from 64K
    # keys: the prefill GPU tests, the suite's W1 and W2, where an eager dense call's time goes
    $T ${TEST_S:-230} $PYTEST tests/kernels/test_gpu_attention.py tests/kernels/test_backward.py \
      -k "${TESTS_K:-not test_gpu_backward_long}" > "$OUT/prefill_gpu_tests.txt" 2>&1
    grep -E "passed|failed|^FAILED|Error" "$OUT/prefill_gpu_tests.txt" | tail -15
    AETHER_BENCH_PARTIAL="$OUT/issue6_partial.json" timeout 250 python3 benchmarks/bench_attention.py \
      --suite issue6 --only uniform,clustered ${SIZES:+--sizes $SIZES} --out "$OUT" > "$OUT/issue6.txt" 2>&1
    tail -n 22 "$OUT/issue6.txt"
    [ -n "${NO_PROFILE:-}" ] && exit 0
    timeout 70 python3 benchmarks/profile_stages.py --only run_dense_choice --out "$OUT" > "$OUT/profile.txt" 2>&1
    grep -E "^\[|op |times_ms" "$OUT/profile.txt"
    ;;
  sweeps)  # the GPU tests the last changes touched (public eager calls, the dense policy, HF eager
    # models), then the decode op's dense path with a mask swept (sweep_decode_dense.py) and the
    # prefill attention pass's warps and stages at 128-key blocks (sweep_prefill_kernels.py)
    $T ${TEST_S:-150} $PYTEST tests/aether_compile/test_transformers_attention.py tests/aether_compile/test_dense_policy.py \
      tests/kernels/test_gpu_attention.py -k "${TESTS_K:-eager or dense or policy}" > "$OUT/sweeps_gpu_tests.txt" 2>&1
    grep -E "passed|failed|^FAILED|Error" "$OUT/sweeps_gpu_tests.txt" | tail -15
    timeout ${DECODE_S:-200} python3 benchmarks/sweep_decode_dense.py --out "$OUT" ${SHAPES:+--shapes $SHAPES} ${DECODE_ARGS:-} \
      > "$OUT/sweep_decode_dense.txt" 2>&1
    grep -vE "^ *$" "$OUT/sweep_decode_dense.txt" | tail -12
    timeout ${PREFILL_S:-200} python3 benchmarks/sweep_prefill_kernels.py --parts attention \
      --lengths ${LENGTHS:-131072 32768} --out "$OUT" > "$OUT/sweep_prefill.txt" 2>&1
    grep -E "^attention|Error" "$OUT/sweep_prefill.txt"
    ;;
  decode_grid_steps)  # what stops 34 and 35 built without a GPU, first part (about 7 minutes)
    $T 100 $PYTEST tests/aether_compile/test_transformers_attention.py tests/aether_compile/test_kv_cache.py \
      -k "${TESTS_K:-cuda_eager_model or masked_dense}" > "$OUT/decode_route_tests.txt" 2>&1
    grep -E "passed|failed|^FAILED|Error" "$OUT/decode_route_tests.txt" | tail -10
    timeout 150 python3 benchmarks/bench_decode.py --ckpt "$CKPT" --deadline-min 1.9 --out "$OUT" \
      > "$OUT/bench_decode.txt" 2>&1
    tail -n 45 "$OUT/bench_decode.txt"
    timeout 70 python3 benchmarks/sweep_decode_dense.py --quick --no-clustered --out "$OUT" \
      > "$OUT/sweep_decode_dense.txt" 2>&1
    grep -E "^B[0-9]" "$OUT/sweep_decode_dense.txt"
    ;;
  prefill_unmasked)  # the prefill GPU tests of stop 35 (dynamic lengths across tiles, the
                     # pass), the pass's variants at 128K and 32K, W2 (about 9 min)
    $T ${TEST_S:-110} $PYTEST -m "" tests/aether_compile/test_inductor_gpu.py tests/kernels/test_forward.py \
      -k "recompile or dynamic or key_blocks or certificate_every_row" > "$OUT/prefill_route_tests.txt" 2>&1
    grep -E "passed|failed|^FAILED|Error" "$OUT/prefill_route_tests.txt" | tail -10
    timeout ${PREFILL_S:-200} python3 benchmarks/sweep_prefill_kernels.py --parts attention \
      --lengths ${LENGTHS:-131072 32768} --out "$OUT" > "$OUT/sweep_prefill.txt" 2>&1
    grep -E "^attention|Error" "$OUT/sweep_prefill.txt"
    AETHER_BENCH_PARTIAL="$OUT/issue6_partial.json" timeout ${SUITE_S:-280} python3 benchmarks/bench_attention.py \
      --suite issue6 --only ${SUITE_ONLY:-clustered} ${SIZES:+--sizes $SIZES} --out "$OUT" > "$OUT/issue6.txt" 2>&1
    tail -n 22 "$OUT/issue6.txt"
    ;;
  w2_no_kept_map)  # stop 36: eager inference without the kept map (the GPU test of it, the
                  # dynamic-length tests of stop 35's last commits), then W2 at 32K and 128K
    $T ${TEST_S:-150} $PYTEST -m "" tests/aether_compile/test_inductor_gpu.py tests/kernels/test_forward.py \
      -k "recompile or dynamic or eager_inference" > "$OUT/gpu_tests.txt" 2>&1
    grep -E "passed|failed|^FAILED|Error" "$OUT/gpu_tests.txt" | tail -10
    w2_suite _w2_inference ${SUITE_S:-330}
    ;;
  row_tails)  # stop 37: the pass's re-certification with row tails: its GPU tests (soundness on
              # every row at the kernel's real tiles), W2 at 32K and 128K, then the pass's
              # variants at 128K and 32K (row tails against the tile's tail alone)
    $T ${TEST_S:-110} $PYTEST -m "" tests/kernels/test_forward.py tests/aether_compile/test_inductor_gpu.py \
      -k "row_tails or recert or eager_inference or certificate_every_row" > "$OUT/gpu_tests.txt" 2>&1
    grep -E "passed|failed|^FAILED|Error" "$OUT/gpu_tests.txt" | tail -10
    w2_suite _w2_row_tails ${SUITE_S:-290}
    timeout ${PREFILL_S:-150} python3 benchmarks/sweep_prefill_kernels.py --parts attention \
      --lengths ${LENGTHS:-131072 32768} --out "$OUT" > "$OUT/sweep_prefill.txt" 2>&1
    grep -E "^recert|^attention|Error" "$OUT/sweep_prefill.txt"
    ;;
  prefill_ws)  # issue 22's next lever: the GPU tests of the warp-specialized visit loops and of
               # K and V through tensor descriptors, then the pass's variants at 128K and 32K with
               # those among them and Flex on the same blocks (sweep_prefill_kernels' attention)
    if [ -z "${SKIP_TESTS:-}" ]; then
      $T ${TEST_S:-120} $PYTEST -m "" tests/kernels/test_forward.py -k "warp_specialized or recertifying" \
        > "$OUT/gpu_tests.txt" 2>&1
      grep -E "passed|failed|^FAILED|Error" "$OUT/gpu_tests.txt" | tail -6
    fi
    timeout ${PREFILL_S:-400} python3 benchmarks/sweep_prefill_kernels.py --parts attention \
      --lengths ${LENGTHS:-131072 32768} --out "$OUT" > "$OUT/sweep_attention.txt" 2>&1
    grep -E "^attention [0-9]+ (warp|tma)|^attention [0-9]+:|Error" "$OUT/sweep_attention.txt" | cut -c1-600
    ;;
  row_tails_sweep)  # what might make row tails pay (they are off): the pass at 128K and 64K over
                    # the anchor's reach and tail, the scan's chunk; the tile's tail and no
                    # re-certification beside them (about 3 minutes)
    timeout ${PREFILL_S:-300} python3 benchmarks/sweep_prefill_kernels.py --parts row_tails \
      --lengths ${LENGTHS:-131072 65536} --out "$OUT" > "$OUT/sweep_row_tails.txt" 2>&1
    grep -E "^row_tails|Error" "$OUT/sweep_row_tails.txt"
    ;;
  generate_b8)  # generate at batch 8 and 32K (the size from which decode may certify), CKPT: the
                # long LM's weights carried as .ckpt. Six child processes (default compile,
                # eager, eps 0 / 0.01 / 0.1, default compile again), each compiling cold on a
                # fresh machine (a row took over 60 s there: 110 s each). GRAPHS=1: the eps
                # rows again under CUDA graphs (GENERATE_EPS=0.1 GRAPHS=1 fits one call)
    timeout ${GENERATE_S:-560} python3 benchmarks/bench_generate.py \
      --sites ${GENERATE_SITES:-certified} --ckpt "$CKPT" --batch 8 \
      --mode default --row-timeout-s 110 --eps ${GENERATE_EPS:-0 0.01 0.1} ${GRAPHS:+--graphs} --out "$OUT" \
      > "$OUT/bench_generate.txt" 2>&1
    tail -n 16 "$OUT/bench_generate.txt"
    ;;
  generate_b8_fresh)  # a fresh machine: train the long LM (2 min), then generate at batch 8 and
                      # 32K with it (its weights come back in $OUT): three timed calls a
                      # configuration, the default compile before and after the aether rows
    TRAIN_MIN=${TRAIN_MIN:-2} bash "$0" train_long_lm
    timeout ${GENERATE_S:-400} python3 benchmarks/bench_generate.py \
      --sites ${GENERATE_SITES:-certified} --ckpt "$OUT/long_lm.pt" --batch 8 \
      --mode default --row-timeout-s 110 --eps ${GENERATE_EPS:-0 0.01 0.1} --out "$OUT" > "$OUT/bench_generate.txt" 2>&1
    tail -n 16 "$OUT/bench_generate.txt"
    ;;
  prefill_head)  # the prefill pass at this commit: GPU tests of eager inference, row tails and
                 # dynamic lengths; the suite's W2 at 32K and 128K (row tails off, the default;
                 # tag _w2_head); the row tails' sweep at 128K
    $T ${TEST_S:-120} $PYTEST -m "" tests/kernels/test_forward.py tests/aether_compile/test_inductor_gpu.py \
      -k "recompile or dynamic or eager_inference or row_tails or recert" > "$OUT/gpu_tests.txt" 2>&1
    grep -E "passed|failed|^FAILED|Error" "$OUT/gpu_tests.txt" | tail -10
    w2_suite _w2_head ${SUITE_S:-200}
    # last: a cut-short sweep still prints each variant it finished
    LENGTHS=131072 PREFILL_S=${PREFILL_S:-240} bash "$0" row_tails_sweep
    ;;
  compile_time)  # the recorded compile-time ratios: 8 models, cold, forced sparse, 3 repeats each
    timeout 560 python3 benchmarks/compile_time.py --repeats ${REPEATS:-3} --budget-s 470 \
      --out "$OUT" > "$OUT/compile_time.txt" 2>&1
    grep -E "ratio |summary|error|skipped" "$OUT/compile_time.txt"
    ;;
  compile_time_modes)  # cold forced sparse (one run each), cold with the default choices
            # (short sites stay dense), warm forced sparse
    timeout 230 python3 benchmarks/compile_time.py --budget-s 190 --out "$OUT" > "$OUT/compile_time.txt" 2>&1
    timeout 150 python3 benchmarks/compile_time.py --static-dense --budget-s 120 --tag _default \
      --out "$OUT" > "$OUT/compile_time_default.txt" 2>&1
    timeout 120 python3 benchmarks/compile_time.py --warm --models bert,gpt2,llama,vit --budget-s 80 \
      --tag _warm --out "$OUT" > "$OUT/compile_time_warm.txt" 2>&1
    for f in compile_time compile_time_default compile_time_warm; do echo "== $f"; grep -E "ratio|summary|error" "$OUT/$f.txt"; done
    ;;
  precompile)  # the prepare op's kernels compiled while tracing: Inductor's workers (default),
               # this process's threads, none; cold forced sparse, 8 models each, one run
    $T 200 $PYTEST tests/aether_compile/test_precompile.py > "$OUT/precompile_gpu.txt" 2>&1
    for how in ${PRECOMPILE_MODES:-1 threads 0}; do
      AETHER_PRECOMPILE=$how timeout 160 python3 benchmarks/compile_time.py --budget-s 140 \
        --tag "_precompile_$how" --out "$OUT" > "$OUT/compile_time_precompile_$how.txt" 2>&1
    done
    echo "== precompile_gpu"; grep -E "passed|failed|^FAILED|Error" "$OUT/precompile_gpu.txt" | tail -8
    for how in ${PRECOMPILE_MODES:-1 threads 0}; do echo "== AETHER_PRECOMPILE=$how"; grep -E "ratio |summary" "$OUT/compile_time_precompile_$how.txt"; done
    ;;
  *)
    echo "unknown part '$1': see the list at the top of $0" >&2; exit 2
    ;;
esac
