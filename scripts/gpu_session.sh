#!/usr/bin/env bash
# Every GPU measurement of issues 4 and 5 on one host of 4 H200s, in two parts of under ten
# minutes each (the device tool's limit per command). Live runs use one GPU each, so four run at
# once; nothing shares a GPU with a live run.
#
#   part a: GPU 0: calibrate Llama-13B and Llama-3-8B (their whole-step GEMM quantum), the
#           reference check (transformers + peft vs our executor) and bench-gpu; GPU 1: the
#           transformers + peft serving baseline; GPUs 2 and 3, and 0 once free: fidelity runs
#           of the Llama-7B scenarios.
#   part b: GPU 0: calibrate all three models on this host; the others (and GPU 0 once free):
#           live saturation baselines and ablations; then all four: the fidelity runs of the
#           other scenarios, with this host's profiles (or PROFILES).
#
#   part c: the remaining fidelity runs, and part a's scenarios again at 85% load, with part
#           b's profiles if still on its host (else Llama-7B calibrated first).
#
#   part d: GPUs 0-2 calibrate Llama-7B, Llama-13B and Llama-3-8B (one each, saving the raw
#           measurements); GPU 3, and the others once free: the live runs of
#           docs/fidelity/runs-3/host-2 served again (same arrivals), so the profiles and the
#           live runs come from one host. `fidelity.py --resimulate` then compares them (no GPU).
#   part e: the rest of part d's live runs; GPU 3 first serves the transformers + peft baseline
#           at batch 64 (the size not measured before).
#
#   part f: after an executor change: GPU 0 runs the reference check and bench-gpu; GPUs 1-3
#           calibrate the three models; then all four serve part d's live runs again, in the
#           order of F_RUNS (85% and 95% loads first), until the budget ends.
#
#   part g: one GPU, after the change that runs the decode rows' LoRA beside the base GEMMs:
#           the kernel checks, the reference check (LoRA beside the GEMMs and in line),
#           bench-gpu (both ways in the same run), then Llama-7B calibrated with the new
#           executor while the budget lasts.
#
#   part h: one GPU, after the LoRA deltas became f32 (so both LoRA paths give the same bits):
#           the kernel checks and the reference check (stop if either fails), bench-gpu,
#           the three models calibrated with this executor, then the live runs of H_RUNS
#           (runs-3/host-2's scenario files, same arrivals) while the budget lasts.
#   part i: one GPU: the live runs of I_RUNS, likewise; then, while the budget lasts, the live
#           saturation baselines named in I_BASELINES (scripts/baselines.py --execute).
#
#   part j: one GPU, one lease over several calls (each under the tool's ten minutes): with
#           J_CHECKS=1 the kernel checks (doctor), the reference check (transformers + peft)
#           and, last, bench-gpu; the models of J_MODELS
#           calibrated (saving the raw measurements), each unless this machine already holds
#           its profile from an earlier call; then the live runs of J_RUNS (runs-3/host-2's
#           scenario files, same arrivals) while the budget lasts. Every call records the GPU's
#           UUID, so calls that landed on another machine are told apart; on a fresh machine
#           the profiles are measured again before its runs. With J_CHECKS=1 the live runs
#           stop BENCH_RESERVE_S (default 120) seconds early, so bench-gpu keeps its time.
#           J_GPU (a catalogue key, e.g. h100-sxm): the machine is not an H200, so J_RUNS are
#           new runs at fractions of the capacity its own profiles give (fidelity.py --gpu).
#           J_REPLAYS (before the live runs): recorded live runs made again on this GPU with
#           `slora-plan replay --execute`, each `RUN:PASSES[:BIN]` (RUN: a folder with
#           `<scenario>/loadNN.yaml` and `loadNN/executed/`, given as `<folder>/<scenario>/loadNN`;
#           PASSES as `--passes` takes them; BIN another build to replay with, for a baseline
#           in the same call), one CSV per run and build in the archive's `replay/`.
#           J_RECALIBRATE (after J_REPLAYS, before the live runs): models calibrated again into
#           profiles-after/, for a second grid of the same machine after its live runs.
#
#   scripts/gpu_session.sh a|b|c|d|e|f|g|h|i|j BIN TRACES OUT [PROFILES]
# BIN: a `--features cuda` build; TRACES: a folder holding AzureLLMInferenceTrace_conv.csv.
set -u
part=$1 bin=$2 traces=$3 out=$4 profiles=${5:-}
work=/tmp/gpu-session
busy=$work/busy
mkdir -p "$out" "$work" "$busy"
export PYTHONUNBUFFERED=1
seconds=${SECONDS_OF_ARRIVALS:-60}
budget=${BUDGET_S:-560}
start=$(date +%s)
left() { echo $((budget - ($(date +%s) - start))); }
# The independent check (tests/gpu/README.md): transformers + peft against our executor on the
# same files; its status is doctor's. $1: doctor's time limit (seconds).
reference_check() {
    timeout 240 python3 tests/gpu/reference.py --out "$work/ref" >"$out/reference.log" 2>&1
    timeout "$1" "$bin" doctor --reference "$work/ref" >>"$out/reference.log" 2>&1
}
reference_check_or_stop() {
    reference_check 150 ||
        { grep -E "FAIL|pass|greedy|identical" "$out/reference.log" | tail -n 30; echo "reference check failed: stopping"; exit 1; }
}

nvidia-smi --query-gpu=index,name,memory.total,clocks.max.sm,power.limit --format=csv >"$out/gpus-$part.csv" 2>&1

half_a=s2-n100,s2-n5,s2-n2000,azure-conv-n500,s1-n5,s1-n100
half_b=s4-llama13b-n100,gqa-llama3-8b-s2-n100,bursty-cv4-n1000
# part c: the rest, and part a's scenarios again at 85% on the host whose profiles predict them.
runs_c=s1-n2000:0.5,s1-n2000:0.85,s1-n2000:0.95,skewed-zipf1.2-n2000:0.5,skewed-zipf1.2-n2000:0.85,skewed-zipf1.2-n2000:0.95,s2-n100:0.85,s2-n5:0.85,s1-n5:0.85,s2-n2000:0.85,s1-n100:0.85,azure-conv-n500:0.85

rerun_from=${RERUN_FROM:-docs/fidelity/runs-3/host-2}

if [ "$part" = j ]; then
    # The GPU's clocks, temperatures and power every 5 s for the whole call, and when each
    # stage began: host 17's first calibration timed memory-bound kernels 2-4% slower than
    # its live steps then ran (docs/FIDELITY.md, session 13), and this says whether clocks or
    # heat moved between them.
    nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,temperature.gpu,temperature.memory,power.draw,utilization.gpu \
        --format=csv -l 5 >>"$out/clocks.csv" 2>&1 &
    sampler=$!
    trap 'kill $sampler 2>/dev/null' EXIT
    stage() { echo "$(date -u +%FT%T) $*" >>"$out/timeline.log"; }
    stage start
    uuid=$(nvidia-smi --query-gpu=uuid --format=csv,noheader 2>/dev/null | head -n 1)
    echo "${uuid:-unknown}" >"$out/gpu-uuid.txt"
    if [ -f "$work/uuid" ] && [ "$(cat "$work/uuid")" = "$uuid" ]; then echo "same machine as the last call: $uuid"
    else echo "fresh machine: $uuid"; fi
    echo "$uuid" >"$work/uuid"
    if [ "${J_CHECKS:-0}" = 1 ]; then
        timeout 90 "$bin" doctor >"$out/doctor.log" 2>&1 || { tail -n 40 "$out/doctor.log"; echo "kernel checks failed: stopping"; exit 1; }
        echo "doctor: $(grep -cE ' pass$' "$out/doctor.log") checks pass, $(grep -cE ' FAIL$' "$out/doctor.log") fail; $(tail -n 1 "$out/doctor.log")"
        reference_check_or_stop
        grep -E "FAIL|greedy|identical" "$out/reference.log" | tail -n 8
    fi
    # calibrate_into DIR LOG WORD MODELS...: each model calibrated into $work/DIR unless this
    # machine holds its profile there already (any GPU's: h200-, h100-...), while the budget
    # lasts; the folder goes into OUT at once as DIR.tgz (the device tool returns at most
    # eight files), so a call cut short at the tool's limit still returns what it measured.
    calibrate_into() {
        local dir=$1 log=$2 word=$3 m
        shift 3
        for m in "$@"; do
            compgen -G "$work/$dir/*-$m.json" >/dev/null && continue
            [ "$(left)" -gt 150 ] || { echo "no time to calibrate $m$word"; break; }
            stage "calibrate $m$word"
            timeout $(($(left) - 20)) "$bin" calibrate --model "$m" --reps "${REPS:-4}" \
                --out "$work/$dir" >>"$out/$log" 2>&1
            tar czf "$out/$dir.tgz" -C "$work" "$dir" 2>/dev/null
        done
    }
    # shellcheck disable=SC2086 # model lists are space-separated words
    calibrate_into profiles calibrate.log "" ${J_MODELS:-}
    grep -E "^Measured in" "$out/calibrate.log" 2>/dev/null
    mkdir -p "$work/replay"
    for entry in ${J_REPLAYS:-}; do
        run=${entry%%:*} rest=${entry#*:}
        passes=${rest%%:*} with=$bin
        [ "$rest" != "$passes" ] && with=${rest#*:}
        name=$(echo "$run" | tr / - | sed 's/^docs-fidelity-//')
        [ "$with" != "$bin" ] && name="$name-$(basename "$with")"
        [ "$(left)" -gt 120 ] || { echo "no time to replay $run"; break; }
        python3 -c "import sys; sys.path.insert(0, 'scripts'); from fidelity import retarget; print(retarget('$run.yaml', '$traces'), end='')" >"$work/replay/$name.yaml"
        timeout $(($(left) - 20)) "$with" replay "$work/replay/$name.yaml" --steps "$run/executed" \
            --execute --passes "$passes" --out "$work/replay/$name.csv" >"$out/replay-$name.log" 2>&1
        echo "replay $name (rc $?):"; tail -n 8 "$out/replay-$name.log"
        [ -f "$work/replay/$name.csv" ] && gzip -f "$work/replay/$name.csv"
    done
    # J_RECALIBRATE: models measured again, after the live runs of an earlier call on this
    # machine, into profiles-after/: says whether a fresh machine's first calibration ran slow
    # (host 17, session 13) by setting the same machine's two grids side by side.
    # shellcheck disable=SC2086
    calibrate_into profiles-after calibrate-after.log " again" ${J_RECALIBRATE:-}
    # bench-gpu comes last but keeps its time: the live runs stop that much earlier.
    reserve=0; [ "${J_CHECKS:-0}" = 1 ] && reserve=${BENCH_RESERVE_S:-120}
    if [ -n "${J_RUNS:-}" ] && [ -n "${J_GPU:-}" ] && [ "$(($(left) - reserve))" -gt 100 ]; then
        # Another GPU than the runs' (J_GPU: its catalogue key): new live runs at fractions
        # of the capacity this machine's profiles give, each beside its simulation.
        stage "live runs $J_RUNS"
        timeout $(($(left) - 10 - reserve)) python3 scripts/fidelity.py --bin "$bin" --out "$work/fid-j" --traces "$traces" \
            --profiles "$work/profiles" --gpu "$J_GPU" --runs "$J_RUNS" --seconds "$seconds" \
            --deadline-s $(($(left) - 20 - reserve)) >"$out/fidelity.log" 2>&1
        tail -n 14 "$out/fidelity.log"
    elif [ -n "${J_RUNS:-}" ] && [ "$(($(left) - reserve))" -gt 100 ]; then
        stage "live runs $J_RUNS"
        timeout $(($(left) - 10 - reserve)) python3 scripts/fidelity.py --bin "$bin" --out "$work/fid-j" --traces "$traces" \
            --rerun "$rerun_from" --runs "$J_RUNS" --seconds "$seconds" \
            --deadline-s $(($(left) - 20 - reserve)) >"$out/rerun.log" 2>&1
        tail -n 14 "$out/rerun.log"
    fi
    if [ "${J_CHECKS:-0}" = 1 ] && [ "$(left)" -gt 100 ]; then
        stage bench-gpu
        timeout $(($(left) - 10)) "$bin" bench-gpu >"$out/bench-gpu.log" 2>&1
        grep -E "^\| (1|32|64|128|256) \|" "$out/bench-gpu.log" | head -n 24
    fi
    stage end
    kill $sampler 2>/dev/null
    # The device tool returns at most eight files: the run folders go back as one archive,
    # the logs as another.
    tar czf "$out/part-j.tgz" -C "$work" $(cd "$work" && ls -d profiles profiles-after fid-j replay 2>/dev/null)
    (cd "$out" && tar czf logs.tgz --remove-files $(ls | grep -v '\.tgz$'))
    echo "part j done in $(($(date +%s) - start)) s"
    exit 0
elif [ "$part" = h ] || [ "$part" = i ]; then
    if [ "$part" = h ]; then
        timeout 90 "$bin" doctor >"$out/doctor.log" 2>&1 || { tail -n 40 "$out/doctor.log"; echo "kernel checks failed: stopping"; exit 1; }
        reference_check_or_stop
        timeout 280 "$bin" bench-gpu >"$out/bench-gpu.log" 2>&1
        for m in llama-7b llama-13b llama-3-8b; do
            timeout 240 "$bin" calibrate --model "$m" --reps "${REPS:-4}" \
                --out "$work/profiles" >>"$out/calibrate.log" 2>&1
        done
        runs=${H_RUNS:-}
    else
        runs=${I_RUNS:-}
    fi
    if [ -n "$runs" ] && [ "$(left)" -gt 100 ]; then
        timeout $(($(left) - 10)) python3 scripts/fidelity.py --bin "$bin" --out "$work/fid-$part" --traces "$traces" \
            --rerun "$rerun_from" --runs "$runs" --seconds "$seconds" \
            --deadline-s $(($(left) - 20)) >"$out/rerun-$part.log" 2>&1
    fi
    if [ "$part" = i ] && [ -n "${I_BASELINES:-}" ] && [ "$(left)" -gt 90 ]; then
        timeout $(($(left) - 10)) python3 scripts/baselines.py --bin "$bin" --out "$work/baselines-i" --execute \
            --seconds "${BASELINE_SECONDS:-45}" --only "$I_BASELINES" --deadline-s $(($(left) - 20)) >"$out/baselines-i.log" 2>&1
    fi
    tar czf "$out/part-$part.tgz" -C "$work" $(cd "$work" && ls -d profiles fid-$part baselines-i 2>/dev/null)
    if [ "$part" = h ]; then
        grep -E "FAIL|pass|greedy|identical" "$out/reference.log" | tail -n 30
        grep -E "^\| (1|32|64|128|256) \|" "$out/bench-gpu.log" | sed -n 6,10p
        grep -E "^Measured in" "$out/calibrate.log"
    fi
    tail -n 12 "$out"/rerun-$part.log "$out"/baselines-i.log 2>/dev/null
    echo "part $part done in $(($(date +%s) - start)) s"
    exit 0
elif [ "$part" = g ]; then
    timeout 90 "$bin" doctor >"$out/doctor.log" 2>&1
    reference_check 150
    timeout 280 "$bin" bench-gpu >"$out/bench-gpu.log" 2>&1
    if [ "$(left)" -gt 120 ]; then
        timeout $(($(left) - 15)) "$bin" calibrate --model llama-7b --reps "${REPS:-4}" \
            --out "$work/profiles" >"$out/calibrate-llama-7b.log" 2>&1
    fi
    tar czf "$out/part-g.tgz" -C "$work" profiles 2>/dev/null
    grep -E "FAIL|pass|greedy|max" "$out/reference.log" | tail -n 30
    grep -E "^\| (1|32|64|128|256) \|" "$out/bench-gpu.log" | head -n 20
    tail -n 5 "$out"/calibrate-llama-7b.log 2>/dev/null
    echo "part $part done in $(($(date +%s) - start)) s"
    exit 0
elif [ "$part" = f ]; then
    touch "$busy/gpu0.busy" "$busy/gpu1.busy"
    (
        export CUDA_VISIBLE_DEVICES=0
        reference_check 120
        timeout 200 "$bin" bench-gpu >"$out/bench-gpu.log" 2>&1
        rm -f "$busy/gpu0.busy"
    ) &
    # GPUS=2: GPU 1 calibrates the three models one after the other.
    if [ "${GPUS:-4}" = 2 ]; then plan=("1:llama-7b llama-3-8b llama-13b"); pool=1,0
    else plan=("1:llama-7b" "2:llama-13b" "3:llama-3-8b"); pool=1,2,3,0; fi
    rm -f "$busy"/gpu[2-3].busy
    [ "${GPUS:-4}" = 2 ] || touch "$busy/gpu2.busy" "$busy/gpu3.busy"
    for job in "${plan[@]}"; do
        g=${job%%:*}
        (
            export CUDA_VISIBLE_DEVICES=$g
            for m in ${job#*:}; do
                timeout 300 "$bin" calibrate --model "$m" --reps "${REPS:-5}" \
                    --out "$work/fid-f/profiles" >"$out/calibrate-$m.log" 2>&1
            done
            rm -f "$busy/gpu$g.busy"
        ) &
    done
    timeout $(($(left) - 15)) python3 scripts/fidelity.py --bin "$bin" --out "$work/fid-f" --traces "$traces" \
        --rerun "$rerun_from" --runs "$F_RUNS" --seconds "$seconds" --gpus $pool --busy-dir "$busy" \
        --deadline-s $(($(left) - 25)) >"$out/rerun-f.log" 2>&1
    wait
    tar czf "$out/part-f.tgz" -C "$work" fid-f
elif [ "$part" = d ]; then
    for g in 0 1 2; do touch "$busy/gpu$g.busy"; done
    models=(llama-7b llama-13b llama-3-8b)
    for g in 0 1 2; do
        (
            export CUDA_VISIBLE_DEVICES=$g
            timeout 400 "$bin" calibrate --model "${models[$g]}" --reps "${REPS:-5}" \
                --out "$work/fid-d/profiles" >"$out/calibrate-${models[$g]}.log" 2>&1
            rm -f "$busy/gpu$g.busy"
        ) &
    done
    timeout $(($(left) - 15)) python3 scripts/fidelity.py --bin "$bin" --out "$work/fid-d" --traces "$traces" \
        --rerun "$rerun_from" --seconds "$seconds" --gpus 3,0,1,2 --busy-dir "$busy" \
        --deadline-s $(($(left) - 25)) >"$out/rerun-d.log" 2>&1
    wait
    tar czf "$out/part-d.tgz" -C "$work" fid-d
elif [ "$part" = e ]; then
    # Only the runs part d did not serve.
    todo=$(cd "$rerun_from" && for y in */load*.yaml; do
        s=${y%%/*} l=${y##*/load}; l=${l%.yaml}
        [ -f "$work/fid-d/$s/load$l/executed/metrics.json" ] || printf '%s:%s,' "$s" "$(python3 -c "print(f'{$l/100:g}')")"
    done)
    echo "part e runs: $todo" >"$out/rerun-e.log"
    if [ "${PEFT:-1}" = 1 ]; then
        touch "$busy/gpu3.busy"
        (
            export CUDA_VISIBLE_DEVICES=3
            timeout $(($(left) - 20)) python3 scripts/peft_baseline.py --out "$work/peft-e" --batch-sizes 64 \
                --per-batch-size-s 450 --deadline-s $(($(left) - 60)) --hard-deadline-s $(($(left) - 30)) >"$out/peft.log" 2>&1
            rm -f "$busy/gpu3.busy"
        ) &
    fi
    if [ -n "$todo" ]; then
        timeout $(($(left) - 15)) python3 scripts/fidelity.py --bin "$bin" --out "$work/fid-d" --traces "$traces" \
            --rerun "$rerun_from" --runs "${todo%,}" --seconds "$seconds" --gpus 0,1,2,3 --busy-dir "$busy" \
            --deadline-s $(($(left) - 40)) >>"$out/rerun-e.log" 2>&1
    fi
    wait
    cp -r "$work/peft-e" "$work/fid-d/peft-e" 2>/dev/null
    tar czf "$out/part-e.tgz" -C "$work" fid-d
elif [ "$part" = a ]; then
    touch "$busy/gpu0.busy" "$busy/gpu1.busy"
    (
        export CUDA_VISIBLE_DEVICES=0
        timeout 150 "$bin" calibrate --model llama-13b --model llama-3-8b --reps 3 --out "$work/fid-a/profiles" >"$out/calibrate.log" 2>&1
        reference_check 120
        timeout 200 "$bin" bench-gpu >"$out/bench-gpu.log" 2>&1
        rm -f "$busy/gpu0.busy"
    ) &
    (
        export CUDA_VISIBLE_DEVICES=1
        # transformers + peft gets its GPU for the whole part: its largest batches take minutes.
        timeout 550 python3 scripts/peft_baseline.py --out "$work/peft" --batch-sizes 128,64,32,16 \
            --deadline-s 470 --hard-deadline-s 535 >"$out/peft.log" 2>&1
        rm -f "$busy/gpu1.busy"
    ) &
    timeout $(($(left) - 15)) python3 scripts/fidelity.py --bin "$bin" --out "$work/fid-a" --traces "$traces" \
        --only "$half_a" --seconds "$seconds" --gpus 0,1,2,3 --busy-dir "$busy" \
        --deadline-s $(($(left) - 25)) >"$out/fidelity-a.log" 2>&1
    wait
    cp -r "$work/peft" "$work/fid-a/peft" 2>/dev/null
    tar czf "$out/part-a.tgz" -C "$work" fid-a
elif [ "$part" = b ]; then
    # GPU 0 re-calibrates all three models on this host (dense GEMM token grid) while the
    # others serve the saturation baselines; the fidelity runs then use those profiles.
    touch "$busy/gpu0.busy"
    (
        export CUDA_VISIBLE_DEVICES=0
        timeout 240 "$bin" calibrate --model llama-7b --model llama-13b --model llama-3-8b --reps 3 \
            --out "$work/fid-b/profiles" >"$out/calibrate.log" 2>&1
        rm -f "$busy/gpu0.busy"
    ) &
    timeout 330 python3 scripts/baselines.py --bin "$bin" --out "$work/baselines" --execute \
        --seconds "${BASELINE_SECONDS:-45}" --gpus 1,2,3,0 --busy-dir "$busy" --deadline-s 300 >"$out/baselines.log" 2>&1
    wait
    timeout $(($(left) - 15)) python3 scripts/fidelity.py --bin "$bin" --out "$work/fid-b" --traces "$traces" \
        --profiles "${profiles:-$work/fid-b/profiles}" --only "$half_b" --seconds "$seconds" --gpus 0,1,2,3 \
        --deadline-s $(($(left) - 25)) >"$out/fidelity-b.log" 2>&1
    tar czf "$out/part-b.tgz" -C "$work" fid-b baselines
else
    # Part c: with part b's profiles when this is still its host, else calibrate Llama-7B here.
    if [ -z "$profiles" ] && [ -f "$work/fid-b/profiles/h200-llama-7b.json" ]; then
        profiles=$work/fid-b/profiles
        echo "part b's host: its profiles" >"$out/calibrate-c.log"
    elif [ -z "$profiles" ]; then
        profiles=$work/fid-c/profiles
        CUDA_VISIBLE_DEVICES=0 timeout 100 "$bin" calibrate --model llama-7b --reps 3 --out "$profiles" >"$out/calibrate-c.log" 2>&1
    fi
    timeout $(($(left) - 15)) python3 scripts/fidelity.py --bin "$bin" --out "$work/fid-c" --traces "$traces" \
        --profiles "$profiles" --runs "$runs_c" --seconds "$seconds" --gpus 0,1,2,3 \
        --deadline-s $(($(left) - 25)) >"$out/fidelity-c.log" 2>&1
    cp -r "$profiles" "$work/fid-c/profiles-used" 2>/dev/null
    tar czf "$out/part-c.tgz" -C "$work" fid-c
fi
tail -n 25 "$out"/*.log
echo "part $part done in $(($(date +%s) - start)) s"
