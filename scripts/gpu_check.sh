#!/usr/bin/env bash
# One-shot check on a machine with an NVIDIA GPU (no internet needed): build the extension with
# the CUDA kernels in place, run the GPU suite, the CPU suite, compute-sanitizer (memcheck,
# racecheck, initcheck; memcheck and initcheck also with XLA's platform allocator) on a small
# representative script, the large-offset tests (operands past 2^31 bytes / elements), and a
# quick benchmark. Logs go to $OUT (default ./out); a summary
# table is printed last.
#
#   scripts/gpu_check.sh                      # build tests sm80 large fuzz sanitize bench cpu
#   scripts/gpu_check.sh build sm80           # on a Hopper card: the GPU suite, fuzz and
#                                             # sanitizers with the sm80 family forced
#                                             # (JPA_CUDA_FAMILY=sm80; sm90 is the default there)
#   scripts/gpu_check.sh build tma            # on a Hopper card: the GPU suite, fuzz and
#                                             # sanitizers with the sm90 kernel's TMA loads on
#                                             # (JPA_CUDA_KV_TMA=1, experimental)
#   scripts/gpu_check.sh build tests          # only some parts (build is implied if needed)
#   scripts/gpu_check.sh prefill decode generate
#                                             # the full prefill, decode (--extra points) and
#                                             # generation benchmarks (not in the default
#                                             # list: minutes each)
#   scripts/gpu_check.sh decode-splits        # decode (ours) under JPA_CUDA_SPLITS settings
#   scripts/gpu_check.sh profile              # ncu on our prefill kernel and cuDNN's
#   scripts/gpu_check.sh profile-decode       # the same for decode
#   scripts/gpu_check.sh timeline             # tile CTAs' phase times, prefill and decode (a
#                                             # diagnostic build, then the normal one again)
#   scripts/gpu_check.sh variants             # unmerged branches' kernels (.variants/*)
#   VARIANTS_DIR=benchmarks/variants scripts/gpu_check.sh variants
#                                             # the committed patches not yet run on a GPU
#                                             # (VARIANTS="name ...": only those)
#
# Per-part time limits (seconds) can be set with T_BUILD, T_TESTS, T_LARGE, T_FUZZ, T_CPU, T_SAN, T_BENCH,
# T_PREFILL, T_DECODE, T_GENERATE, T_PROFILE,
# T_SMOKE, T_TIMELINE, T_DECODE_SPLIT.
# Extra pytest arguments for the GPU suite: PYTEST_GPU_ARGS (e.g. "-k decode").
# PACK=FILE (outside $OUT): a .tar.gz of $OUT, rewritten after each part.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-./out}
mkdir -p "$OUT"
PARTS=${*:-build tests sm80 large fuzz sanitize bench cpu}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
if [ -z "${CUDACXX:-}" ]; then
  CUDACXX=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
  export CUDACXX
fi

SUMMARY=()
: >"$OUT/summary.txt"
note() {  # also appended to $OUT/summary.txt at once, in case a later part is cut off
  local line
  line=$(printf '%-14s %-8s %6ss  %s' "$1" "$2" "$3" "$4")
  SUMMARY+=("$line")
  echo "$line" >>"$OUT/summary.txt"
  # PACK=FILE: $OUT re-packed after every part, so a call cut off at its time limit still
  # brings back what the finished parts wrote (OUT a scratch folder, PACK under the real one)
  if [ -n "${PACK:-}" ]; then
    tar -czf "$PACK.part" -C "$OUT" . 2>/dev/null && mv -f "$PACK.part" "$PACK"
  fi
}
has() { case " $PARTS " in *" $1 "*) return 0 ;; esac; return 1; }

run_part() {  # name timeout logfile cmd...
  local name=$1 limit=$2 log=$3; shift 3
  local t0=$(date +%s)
  timeout --signal=TERM --kill-after=15 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  echo "[$name] rc=$rc ${dt}s (log: $log)"
  LAST_RC=$rc
  LAST_DT=$dt
}

pytest_counts() {  # last pytest summary line of a log
  grep -E "^(=+ )?[0-9]+ (passed|failed|error|skipped)|^=+ .*(passed|failed|error).* in " "$1" \
    | tail -1 | sed -E 's/=+//g; s/^ +//'
}

# The GPU suite in SHARDS pytest processes sharing the GPU (compilation is the bottleneck,
# not the GPU), with the environment assignments given (e.g. JPA_CUDA_FAMILY=sm80); one log,
# one summary line named $1. Sets SUITE_RCS and SUITE_COUNTS.
gpu_suite() {  # name log [VAR=value ...]
  local name=$1 log=$2; shift 2
  local shards=${SHARDS:-6} t0 k rcs="" counts="" pids=()
  t0=$(date +%s)
  for k in $(seq 0 $((shards - 1))); do
    env "$@" JPA_TEST_SHARD="$k/$shards" timeout --kill-after=15 "${T_TESTS:-240}" \
      "$PY" -m pytest -v --tb=short -rfE --durations=5 -p no:cacheprovider tests/test_gpu.py \
      ${PYTEST_GPU_ARGS:-} ${SUITE_K:+-k "$SUITE_K"} >"$log.$k" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; rcs="$rcs $?"; done
  : >"$log"
  for k in $(seq 0 $((shards - 1))); do
    echo "######## shard $k/$shards" >>"$log"
    cat "$log.$k" >>"$log"
    counts="$counts [$(pytest_counts "$log.$k")]"
    rm -f "$log.$k"
  done
  rcs="${rcs# }"
  LAST_RC=0
  for k in $rcs; do [ "$k" = 0 ] || LAST_RC=$k; done
  echo "[$name] rc=$rcs $(( $(date +%s) - t0 ))s"
  note "$name" "rc=${rcs// /,}" "$(( $(date +%s) - t0 ))" "$counts"
}

# One compute-sanitizer run of scripts/sanitizer_cases.py: RUN is tool:allocator (pool =
# XLA's default pooled allocator, platform = one cudaMalloc per buffer); PREFIX names the
# run ("" or e.g. sm80); the VAR=value assignments go into its environment. Inside the pool,
# a read past the end of an operand lands in memory XLA owns: memcheck cannot see it, and
# initcheck reports it only if those bytes were never written. With one allocation per
# buffer memcheck sees every access outside an operand (docs/sanitizers.md). Each run has its
# own log and summary line; a run with errors also gets the operand each reported address
# falls in (scripts/sanitizer_cases.py --map).
sanitize_run() {  # tool:allocator prefix [VAR=value ...]
  local run=$1 prefix=$2; shift 2
  local tool=${run%%:*} name log summ done_ok where
  local extra=() alloc=()
  name=${prefix:+$prefix-}$tool
  log="$OUT/sanitizer_${prefix:+${prefix}_}$tool"
  if [ "${run#*:}" = platform ]; then
    name=$name-plat log=${log}_platform
    alloc=(XLA_PYTHON_CLIENT_ALLOCATOR=platform)
    # guard bytes after every allocation: an overrun cannot land in a neighbouring buffer
    [ "$tool" = memcheck ] && extra=(--padding 256)
  fi
  log=$log.log
  # memcheck / racecheck instrument only our kernels (names contain jpa). initcheck must see
  # every kernel: writes by uninstrumented XLA kernels would look uninitialized.
  local filter=(--kernel-name kns=jpa)
  [ "$tool" = initcheck ] && filter=()
  run_part "$name" "${T_SAN:-75}" "$log" env "$@" "${alloc[@]}" compute-sanitizer \
    --tool "$tool" "${filter[@]}" "${extra[@]}" --error-exitcode 99 "$PY" \
    scripts/sanitizer_cases.py
  if ! grep -q "ERROR SUMMARY\|RACECHECK SUMMARY\|sanitizer_cases: done" "$log"; then
    # this compute-sanitizer does not know the filter (or padding) option: check every
    # kernel, without padding
    run_part "$name" "${T_SAN:-75}" "$log" env "$@" "${alloc[@]}" compute-sanitizer \
      --tool "$tool" --error-exitcode 99 "$PY" scripts/sanitizer_cases.py
  fi
  summ=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$log" | tail -1)
  done_ok=$(grep -c "sanitizer_cases: done" "$log")
  where=""
  if grep -qE "ERROR SUMMARY: [1-9]" "$log"; then
    "$PY" scripts/sanitizer_cases.py --map "$log" >"$log.map" 2>&1
    where=$(tail -1 "$log.map")
  fi
  note "$name" "rc=$LAST_RC" "$LAST_DT" \
    "${summ:-no summary} (script done: $done_ok)${where:+; $where, see $log.map}"
}

# One build of the extension with the CUDA kernels (pip, editable; a plain CMake build if
# pip fails), the compiled module copied into the package; sets LAST_RC / LAST_DT. A build
# directory other than build/gpu and extra CMake definitions (NAME=VALUE) may follow.
build_ext() {  # name log [build dir [NAME=VALUE ...]]
  local name=$1 log=$2 bdir=${3:-build/gpu} def defs=()
  shift 2; [ $# -gt 0 ] && shift
  for def in "$@"; do defs+=(-C "cmake.define.$def"); done
  run_part "$name" "${T_BUILD:-240}" "$log" env JPA_CUDA=ON \
    "$PY" -m pip install --no-build-isolation --no-deps -v -e . \
    -C cmake.define.CMAKE_CUDA_ARCHITECTURES=90 -C build-dir="$bdir" ${defs[@]+"${defs[@]}"}
  if [ "$LAST_RC" != 0 ]; then
    # Fallback: a plain CMake build of the extension (same sources and flags).
    echo "######## pip build failed (rc=$LAST_RC); trying cmake directly" >>"$log"
    cp "$log" "$log.pip"
    run_part "$name-cmake" "${T_BUILD:-240}" "$log.cmake" bash -c \
      "cmake -S . -B $bdir-cmake -G Ninja -DJPA_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
         ${*/#/-D} -DPython_EXECUTABLE=\"\$(command -v $PY)\" && cmake --build $bdir-cmake"
    cat "$log.pip" "$log.cmake" >"$log"
    rm -f "$log.pip" "$log.cmake"
  fi
  if [ "$LAST_RC" = 0 ]; then
    # Make the in-tree package importable whatever the editable mode does.
    local so
    so=$(find "$bdir" "$bdir-cmake" -name '_jpa_ffi*.so' -newer pyproject.toml 2>/dev/null | head -1)
    [ -n "$so" ] && cp -f "$so" jax_paged_attn/
    "$PY" -c "import jax_paged_attn as j; print('cuda kernels:', j._registry.has_cuda_kernels())" \
      >>"$log" 2>&1
    # ptxas reports wgmma serialization (C75xx "Potential Performance Loss") as info lines
    grep -E "spill|ptxas (warning|error)|Performance Loss" "$log" | sort -u | head -20 >>"$log"
  fi
}

# ---------------------------------------------------------------------------- build
# A call cut off inside the variants part leaves a variant's sources on a warm machine; the
# next call's copy of the tree brings the tree's files back with their old mtimes, older than
# the variant's objects, so an incremental build would keep the variant. The marker (in the
# build folder, which survives between calls) says so: touch the sources, rebuild them all;
# it goes once a build of the tree's own sources has succeeded.
SWAP_MARK=build/gpu/.variant_swapped_in
[ -f "$SWAP_MARK" ] && find ffi_src CMakeLists.txt -type f -exec touch {} +
if has build || [ -f "$SWAP_MARK" ] || ! ls jax_paged_attn/_jpa_ffi*.so >/dev/null 2>&1; then
  build_ext build "$OUT/build.log"
  if [ "$LAST_RC" = 0 ]; then
    rm -f "$SWAP_MARK"
    note build ok "$LAST_DT" "$(grep -m1 'cuda kernels:' "$OUT/build.log")"
  else
    note build FAIL "$LAST_DT" "$(grep -m1 -E 'error' "$OUT/build.log")"
    printf '%s\n' "${SUMMARY[@]}"
    exit 1
  fi
fi

# ---------------------------------------------------------------------------- CPU suite (background)
# The CPU suite needs no GPU: it runs beside the GPU shards (pytest is compile-bound).
CPU_PID=""
if has cpu; then
  CPU_T0=$(date +%s)
  env JAX_PLATFORMS=cpu timeout --kill-after=15 "${T_CPU:-300}" \
    "$PY" -m pytest -q -p no:cacheprovider tests --ignore=tests/test_gpu.py \
    --ignore=tests/test_gpu_large.py \
    >"$OUT/cpu_tests.log" 2>&1 &
  CPU_PID=$!
fi

# ---------------------------------------------------------------------------- GPU tests
if has tests; then
  gpu_suite gpu-tests "$OUT/gpu_tests.log"
fi

# Does this build and card run the sm90 prefill family? Sets SM90_WHY (families, compute
# capability) for the skip notes of the parts that need it.
sm90_here() {
  local fams cc
  fams=$("$PY" -c "import jax_paged_attn as j; print(' '.join(j._registry.cuda_kernel_families()))")
  cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1)
  SM90_WHY="families: $fams; compute capability $cc"
  [ "${fams#*sm90}" != "$fams" ] && [ "$cc" = "9.0" ]
}

# ---------------------------------------------------------------------------- sm80 family
# On a Hopper card the default launch runs prefill on the sm90 family (wgmma); this part runs
# the GPU suite, a fuzz run and the sanitizers again with the portable sm80 family forced
# (JPA_CUDA_FAMILY=sm80), so one card checks both. Elsewhere sm80 is the default already.
if has sm80; then
  if ! sm90_here; then
    note sm80 skip 0 "the default launch is sm80 here ($SM90_WHY)"
  else
    gpu_suite sm80-tests "$OUT/sm80_tests.log" JPA_CUDA_FAMILY=sm80
    run_part sm80-fuzz "${T_FUZZ:-480}" "$OUT/sm80_fuzz.log" env JPA_CUDA_FAMILY=sm80 \
      "$PY" scripts/gpu_fuzz.py --cases "${FUZZ_SM80_CASES:-300}" --seed 30000 --out "$OUT"
    note sm80-fuzz "rc=$LAST_RC" "$LAST_DT" "$(grep -h '^gpu_fuzz:' "$OUT/sm80_fuzz.log" | tr '\n' ' ')"
    for run in memcheck:pool racecheck:pool initcheck:pool; do
      sanitize_run "$run" sm80 JPA_CUDA_FAMILY=sm80
    done
  fi
fi

# ---------------------------------------------------------------------------- TMA loads
# The sm90 prefill kernel's TMA loads of K / V tiles (JPA_CUDA_KV_TMA=1, off by default): the
# GPU suite, a fuzz run and the sanitizers with the switch on (a Hopper card only, and a tree
# that has the switch: benchmarks/variants/sm90-kv-tma.patch until it lands).
if has tma; then
  if ! "$PY" -c "from jax_paged_attn import launch_options as l; assert 'launch_kv_tma' in l.SWITCHES" 2>/dev/null; then
    note tma skip 0 "this tree has no JPA_CUDA_KV_TMA switch"
  elif ! sm90_here; then
    note tma skip 0 "no sm90 prefill here ($SM90_WHY)"
  else
    gpu_suite tma-tests "$OUT/tma_tests.log" JPA_CUDA_KV_TMA=1
    run_part tma-fuzz "${T_FUZZ:-480}" "$OUT/tma_fuzz.log" env JPA_CUDA_KV_TMA=1 \
      "$PY" scripts/gpu_fuzz.py --cases "${FUZZ_TMA_CASES:-300}" --seed 40000 --out "$OUT"
    note tma-fuzz "rc=$LAST_RC" "$LAST_DT" "$(grep -h '^gpu_fuzz:' "$OUT/tma_fuzz.log" | tr '\n' ' ')"
    for run in memcheck:pool racecheck:pool initcheck:pool memcheck:platform; do
      sanitize_run "$run" tma JPA_CUDA_KV_TMA=1
    done
  fi
fi

# ---------------------------------------------------------------------------- large offsets
# tests/test_gpu_large.py in one process after the shards (up to ~20 GB of GPU memory a test).
if has large; then
  run_part large "${T_LARGE:-420}" "$OUT/gpu_large.log" "$PY" -m pytest -v --tb=short -rfE \
    --durations=5 -p no:cacheprovider tests/test_gpu_large.py
  note gpu-large "rc=$LAST_RC" "$LAST_DT" "$(pytest_counts "$OUT/gpu_large.log")"
fi

# ---------------------------------------------------------------------------- fuzz
# The CPU suite's generator (tests/fuzz.py) on the CUDA kernels: FUZZ_CASES random cases,
# then FUZZ_BIG_CASES with each case's pages at the far end of a pool past 2^31 bytes.
# Failures land in $OUT/fuzz_failures.jsonl (one `--repro config:draw` per line).
if has fuzz; then
  run_part fuzz "${T_FUZZ:-480}" "$OUT/gpu_fuzz.log" bash -c "\"$PY\" scripts/gpu_fuzz.py \
    --cases ${FUZZ_CASES:-600} --out \"$OUT\"; r1=\$?; \"$PY\" scripts/gpu_fuzz.py \
    --cases ${FUZZ_BIG_CASES:-40} --big-pool-gib 2.5 --seed 20000 --out \"$OUT\"; \
    exit \$(( r1 | \$? ))"
  note gpu-fuzz "rc=$LAST_RC" "$LAST_DT" "$(grep -h '^gpu_fuzz:' "$OUT/gpu_fuzz.log" | tr '\n' ' ')"
fi

# ---------------------------------------------------------------------------- sanitizer
if has sanitize; then
  for run in memcheck:pool racecheck:pool initcheck:pool memcheck:platform initcheck:platform; do
    sanitize_run "$run" ""
  done
fi

# ---------------------------------------------------------------------------- bench
if has bench; then
  run_part bench "${T_BENCH:-90}" "$OUT/bench.log" "$PY" scripts/bench_gpu.py
  note bench "rc=$LAST_RC" "$LAST_DT" "$(grep -E '^decode +B=32 L=4096 +jpa|^prefill +B=4' "$OUT/bench.log" | tr -s ' ' | head -2 | paste -sd';')"
fi

# ---------------------------------------------------------------------------- full benchmarks
# benchmarks/bench_prefill.py (every point; PREFILL_ARGS adds e.g. "--impls ours,cudnn" or
# "--only 1x8192"), benchmarks/bench_decode.py (DECODE_ARGS, default "--extra": the grid and
# the extra points; DECODE_ONLY: its --only, kept whole, since point names have spaces) and
# benchmarks/bench_generate.py (GENERATE_ARGS), outputs under $OUT/prefill, $OUT/decode and
# $OUT/generate.
if has prefill; then
  run_part prefill "${T_PREFILL:-300}" "$OUT/bench_prefill.log" "$PY" benchmarks/bench_prefill.py \
    --out "$OUT/prefill" ${PREFILL_ARGS:-}
  note prefill "rc=$LAST_RC" "$LAST_DT" "$(grep -cE '\| ok \|$' "$OUT/prefill/prefill.md" 2>/dev/null) rows ok"
fi
if has decode; then
  run_part decode "${T_DECODE:-300}" "$OUT/bench_decode.log" "$PY" benchmarks/bench_decode.py \
    --out "$OUT/decode" ${DECODE_ARGS:---extra} ${DECODE_ONLY:+--only "$DECODE_ONLY"}
  note decode "rc=$LAST_RC" "$LAST_DT" "$(grep -cE ' ok *\|?$' "$OUT/decode/decode.md" 2>/dev/null) rows ok"
fi
# decode-splits: bench_decode (ours) at DECODE_SPLITS_POINTS (exact names, grid or --extra
# points, e.g. "grid 1x32768,fp8 128x2048") under each JPA_CUDA_SPLITS
# setting of DECODE_SPLITS ("auto": the launcher's own choice), into $OUT/decode_s<n>; the
# question is whether one wave of split CTAs loses its tail and start (issue 11).
if has decode-splits; then
  for n in ${DECODE_SPLITS:-auto 8 16 48 64}; do
    if [ "$n" = auto ]; then knob=(-u JPA_CUDA_SPLITS); else knob=(JPA_CUDA_SPLITS="$n"); fi
    run_part "decode-s$n" "${T_DECODE_SPLIT:-60}" "$OUT/bench_decode_s$n.log" env "${knob[@]}" \
      "$PY" benchmarks/bench_decode.py --impls ours --extra \
      --only "${DECODE_SPLITS_POINTS:-grid 1x32768,grid 8x8192}" --out "$OUT/decode_s$n"
    note "decode-s$n" "rc=$LAST_RC" "$LAST_DT" "$(grep -hE '^\| [a-z0-9]+ [0-9]+x[0-9]+ \|' "$OUT/decode_s$n/decode.md" 2>/dev/null | cut -d'|' -f2,7,9 | paste -sd';')"
  done
fi
if has generate; then
  run_part generate "${T_GENERATE:-300}" "$OUT/bench_generate.log" "$PY" \
    benchmarks/bench_generate.py --out "$OUT/generate" ${GENERATE_ARGS:-}
  note generate "rc=$LAST_RC" "$LAST_DT" "$(grep -iE 'tokens/s|ratio' "$OUT/bench_generate.log" | tail -2 | paste -sd';')"
fi

# ---------------------------------------------------------------------------- profile
# Nsight Compute on one launch of our kernel and of cuDNN's at one benchmark point: speed of
# light, tensor pipe use, warp stall reasons and their SASS lines. Clocks left alone
# (--clock-control none: the device notes say so). `profile`: prefill at PROFILE_POINT
# (default 1x8192; PROFILE_PEERS=0 leaves cuDNN's kernel out); `profile-decode`: decode at PROFILE_DECODE_POINT (default "grid 1x32768";
# our split tiles and their merge, so two launches).
# The benchmark runs without its CUPTI timer (--no-cupti): under ncu its self-test fails
# anyway, and in runs 10 and 12 the process then segfaulted in every second ncu run of a call.
# The report is kept ($name.ncu-rep), printed by section into the log, and dumped as every
# collected metric (stall reasons, per-pipe activity, shared-memory traffic) into
# $name.raw.csv and per SASS instruction into $name.source.csv, which can be read without ncu.
ncu_run() {  # name bench point impl kernel-regex launches
  local name=$1 bench=$2 point=$3 impl=$4 regex=$5 count=$6 only=$3
  [ "$bench" = prefill ] && only="=$point"  # bench_prefill: exact names start with "="
  run_part "$name" "${T_PROFILE:-150}" "$OUT/$name.log" ncu --clock-control none \
    -k "regex:$regex" --launch-skip 3 --launch-count "$count" --section SpeedOfLight \
    --section ComputeWorkloadAnalysis --section WarpStateStats --section SchedulerStats \
    --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
    --section SourceCounters -f -o "$OUT/$name" "$PY" "benchmarks/bench_$bench.py" \
    --impls "$impl" --reps 3 --no-ref-check --no-cupti --only "$only" --out "$OUT/$name"
  if [ -f "$OUT/$name.ncu-rep" ]; then
    ncu --import "$OUT/$name.ncu-rep" >>"$OUT/$name.log" 2>&1
    ncu --import "$OUT/$name.ncu-rep" --page raw --csv >"$OUT/$name.raw.csv" 2>&1
    # per SASS instruction: where the warps stall (SourceCounters' samples)
    ncu --import "$OUT/$name.ncu-rep" --page source --csv --print-source sass \
      >"$OUT/$name.source.csv" 2>&1 ||
      ncu --import "$OUT/$name.ncu-rep" --page source --csv >"$OUT/$name.source.csv" 2>&1
  fi
  note "$name" "rc=$LAST_RC" "$LAST_DT" "$(grep -m1 -E 'Compute \(SM\) Throughput|DRAM Throughput' "$OUT/$name.log" | tr -s ' ')"
}
if has profile; then
  ncu_run ncu_ours prefill "${PROFILE_POINT:-1x8192}" ours prefill_wgmma 1
  [ "${PROFILE_PEERS:-1}" = 0 ] || ncu_run ncu_cudnn prefill "${PROFILE_POINT:-1x8192}" cudnn sdpa 1
fi
if has profile-decode; then
  ncu_run ncu_decode_ours decode "${PROFILE_DECODE_POINT:-grid 1x32768}" ours \
    "attn_tile|attn_merge" 2
  [ "${PROFILE_PEERS:-1}" = 0 ] ||
    ncu_run ncu_decode_cudnn decode "${PROFILE_DECODE_POINT:-grid 1x32768}" cudnn cudnn 1
fi

# ---------------------------------------------------------------------------- timeline
# Where an attention CTA's time goes: a diagnostic build (JPA_TIMELINE=ON, its own build
# directory) whose tile CTAs print phase stamps, benchmarks/kernel_timeline.py over
# TIMELINE_ARGS (default: its prefill points 4x2048 and 1x8192 and decode points 1x32768 and
# 8x8192) into $OUT/timeline, then the normal build again (incremental in build/gpu).
if has timeline; then
  build_ext build-timeline "$OUT/build_timeline.log" build/gpu-timeline JPA_TIMELINE=ON
  note build-timeline "rc=$LAST_RC" "$LAST_DT" "$(grep -m1 'cuda kernels:' "$OUT/build_timeline.log")"
  if [ "$LAST_RC" = 0 ]; then
    run_part timeline "${T_TIMELINE:-240}" "$OUT/timeline.log" "$PY" benchmarks/kernel_timeline.py \
      --out "$OUT/timeline" ${TIMELINE_ARGS:-}
    note timeline "rc=$LAST_RC" "$LAST_DT" "see $OUT/timeline/timeline.md"
  fi
  build_ext build-tree "$OUT/build_tree.log"
  note build-tree "rc=$LAST_RC" "$LAST_DT" "the normal build again"
fi

# ---------------------------------------------------------------------------- variants
# Kernels of unmerged branches, measured beside the tree's in one call: each folder of
# VARIANTS_DIR (default .variants; untracked, so it travels with the working tree) holds the
# files a branch changes, at their paths, e.g.
#   git diff --name-only main BRANCH | xargs git archive BRANCH | tar -x -C .variants/BRANCH
# and each NAME.patch there (a `git diff` against the tree; benchmarks/variants/ keeps the
# committed ones, which survive between sessions) is applied with git apply or patch -p1.
# Each variant's files are swapped in, built, smoke-tested (VARIANT_SMOKE: a pytest -k
# expression over tests/test_gpu.py) and benchmarked (bench_prefill.py with
# VARIANT_PREFILL_ARGS unless that is "skip"; bench_decode.py with VARIANT_DECODE_ARGS and / or
# VARIANT_DECODE_ONLY (its --only, kept whole: point names have spaces) when either is set;
# ncu on its prefill kernel at PROFILE_POINT when VARIANT_PROFILE is 1 or lists the
# variant's name (space-separated), beside the
# profile part's run on the tree's); then the tree's own files are put back and rebuilt.
# Files are copied with new mtimes both ways, so the incremental build sees every swap.
DEFAULT_SMOKE="family_switch or wgmma or ragged_interleaved_pages or fp8"
# A patch variant becomes a folder variant: its changed files, patched, in a scratch folder.
patch_to_dir() {  # patch dir
  local p=$1 d=$2 f
  for f in $(grep -E '^\+\+\+ b/' "$p" | sed 's|^+++ b/||'); do
    mkdir -p "$d/$(dirname "$f")" && cp "$f" "$d/$f"
  done
  (cd "$d" && { git apply "$p" 2>/dev/null || patch -s -p1 <"$p"; })
}
if has variants; then
  vdirs=()
  # VARIANTS (names, space-separated): only those variants
  wanted() { [ -z "${VARIANTS:-}" ] || case " $VARIANTS " in *" $1 "*) true ;; *) false ;; esac; }
  for vdir in "${VARIANTS_DIR:-.variants}"/*/; do
    [ -d "$vdir" ] && wanted "$(basename "$vdir")" && vdirs+=("$vdir")
  done
  for vp in "${VARIANTS_DIR:-.variants}"/*.patch; do
    [ -f "$vp" ] && wanted "$(basename "$vp" .patch)" || continue
    vdir=$(mktemp -d)/$(basename "$vp" .patch)/
    mkdir -p "$vdir"
    if patch_to_dir "$(realpath "$vp")" "$vdir"; then
      vdirs+=("$vdir")
    else
      note "patch-$(basename "$vp" .patch)" FAIL 0 "does not apply to this tree"
    fi
  done
  for vdir in ${vdirs[@]+"${vdirs[@]}"}; do
    name=$(basename "$vdir")
    keep=$(mktemp -d)
    files=$(cd "$vdir" && find . -type f | sed 's|^\./||')
    mkdir -p "$(dirname "$SWAP_MARK")" && echo "$name" >"$SWAP_MARK"
    for f in $files; do
      if [ -f "$f" ]; then mkdir -p "$keep/$(dirname "$f")" && cp "$f" "$keep/$f"; fi
      mkdir -p "$(dirname "$f")" && cp "$vdir/$f" "$f"
    done
    build_ext "build-$name" "$OUT/build_$name.log"
    note "build-$name" "rc=$LAST_RC" "$LAST_DT" "$(grep -m1 'cuda kernels:' "$OUT/build_$name.log")"
    if [ "$LAST_RC" = 0 ]; then
      # sharded like the suite: pytest is compile-bound, and the large prefill cases take
      # 20-40 s each
      SUITE_K=${VARIANT_SMOKE:-$DEFAULT_SMOKE} T_TESTS=${T_SMOKE:-180} \
        gpu_suite "smoke-$name" "$OUT/smoke_$name.log"
      if [ "$LAST_RC" = 0 ] && [ "${VARIANT_PREFILL_ARGS:-}" != skip ]; then
        run_part "prefill-$name" "${T_PREFILL:-300}" "$OUT/bench_prefill_$name.log" "$PY" \
          benchmarks/bench_prefill.py --out "$OUT/prefill_$name" ${VARIANT_PREFILL_ARGS:---impls ours}
        note "prefill-$name" "rc=$LAST_RC" "$LAST_DT" "see $OUT/prefill_$name/prefill.md"
      fi
      if [ "$LAST_RC" = 0 ] && { [ "${VARIANT_PROFILE:-}" = 1 ] ||
          case " ${VARIANT_PROFILE:-} " in *" $name "*) true ;; *) false ;; esac; }; then
        # ncu on the variant's prefill kernel, as the profile part does for the tree's
        ncu_run "ncu_$name" prefill "${PROFILE_POINT:-1x8192}" ours prefill_wgmma 1
      fi
      if [ "$LAST_RC" = 0 ] && [ -n "${VARIANT_DECODE_ARGS:-}${VARIANT_DECODE_ONLY:-}" ]; then
        run_part "decode-$name" "${T_DECODE:-300}" "$OUT/bench_decode_$name.log" "$PY" \
          benchmarks/bench_decode.py --out "$OUT/decode_$name" ${VARIANT_DECODE_ARGS:-} \
          ${VARIANT_DECODE_ONLY:+--only "$VARIANT_DECODE_ONLY"}
        note "decode-$name" "rc=$LAST_RC" "$LAST_DT" "see $OUT/decode_$name/decode.md"
      fi
    fi
    for f in $files; do
      if [ -f "$keep/$f" ]; then cp "$keep/$f" "$f"; else rm -f "$f"; fi
    done
    rm -rf "$keep"
  done
  build_ext build-tree "$OUT/build_tree.log"
  [ "$LAST_RC" = 0 ] && rm -f "$SWAP_MARK"
  note build-tree "rc=$LAST_RC" "$LAST_DT" "the tree's own kernels again"
fi

# ---------------------------------------------------------------------------- CPU suite (collect)
if [ -n "$CPU_PID" ]; then
  wait "$CPU_PID"
  rc=$?
  note cpu-tests "rc=$rc" "$(( $(date +%s) - CPU_T0 ))" "$(pytest_counts "$OUT/cpu_tests.log")"
fi

echo "==================== gpu_check summary ===================="
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1
printf '%s\n' "${SUMMARY[@]}"
