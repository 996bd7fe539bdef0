#!/usr/bin/env bash
# On a GPU node without internet (run from a copy of this repository): install the wheelhouse that
# `make wheelhouse` built into a target folder, then run the benchmark matrix of jobs.bench_train, one
# JSON record per configuration in OUT_DIR (failures listed in OUT_DIR/failures.txt, the matrix goes on).
#
#   bash .wheelhouse/install_and_bench.sh OUT_DIR [TARGET]          # GPU matrix
#   BENCH_DEVICE=cpu bash .wheelhouse/install_and_bench.sh OUT_DIR  # the tiny CPU matrix (checks this script)
#
# STEPS (default 20) steps per epoch, two epochs; the record is the second epoch.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:?usage: install_and_bench.sh OUT_DIR [TARGET]}
TARGET=${2:-/tmp/bundlerec-site}
PY=${PYTHON:-python3}
STEPS=${STEPS:-20}
DEVICE=${BENCH_DEVICE:-gpu}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # the image's 9.0a breaks DeepSpeed's op builder
export HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"

if ! $PY -c "import ray, deepspeed, mlflow" 2>/dev/null; then
    echo "== installing the wheelhouse into $TARGET"
    mkdir -p "$TARGET"
    tar -xJf "$HERE"/ray-*-slim.tar.xz -C "$TARGET"
    # only what the image lacks: a wheel whose distribution is installed already stays out
    missing=$($PY - "$HERE/wheels" <<'PY'
import glob, importlib.metadata as md, os, re, sys
for w in sorted(glob.glob(os.path.join(sys.argv[1], "*.whl"))):
    dist = re.split(r"-\d", os.path.basename(w), maxsplit=1)[0]
    try:
        md.version(dist)
    except md.PackageNotFoundError:
        print(w)
PY
)
    $PY -m pip install -q --no-index --no-deps --no-compile --target "$TARGET" $missing || exit 1
    export PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}"  # Ray workers inherit it
fi
$PY -c "import ray, deepspeed, mlflow, torch; print('ray', ray.__version__, 'deepspeed', deepspeed.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())" || exit 1

TOKENIZER=$HERE/tokenizer
[ -d "$TOKENIZER" ] || TOKENIZER=all-MiniLM-L6-v2
run() {  # name, then jobs.bench_train arguments
    local name=$1; shift
    echo "== $name"
    if ! $PY -m jobs.bench_train --steps "$STEPS" --tokenizer "$TOKENIZER" --out "$OUT/$name.json" "$@" \
            > "$OUT/$name.log" 2>&1; then
        echo "$name" >> "$OUT/failures.txt"; grep -E "Error|error:" "$OUT/$name.log" | tail -n 3 | cut -c1-300
    fi
}
if [ "$DEVICE" = cpu ]; then
    C=(--config jobs/configs/tiny.yaml model.freeze_layers=0 train.num_workers=2)
    run tiny-bert-z2 --shape tiny-bert "${C[@]}" train.zero_stage=2
    run tiny-qwen2-z3-lora --shape tiny-qwen2 "${C[@]}" train.zero_stage=3 model.lora_rank=4 model.pooling=last
else
    G=(--config jobs/configs/demo.yaml model.freeze_layers=0 train.use_gpu=true train.num_workers=1
       train.cpus_per_worker=8 train.precision=bf16)
    for z in 0 2 3; do run minilm-l6-z$z --shape minilm-l6 "${G[@]}" train.zero_stage=$z train.micro_batch=128; done
    for z in 0 2; do run bert-large-z$z --shape bert-large "${G[@]}" train.zero_stage=$z train.micro_batch=128; done
    run bert-large-z3 --shape bert-large "${G[@]}" train.zero_stage=3 train.micro_batch=64
    D=(model.pooling=last train.micro_batch=32)
    run qwen2-0.5b-z2 --shape qwen2-0.5b "${G[@]}" "${D[@]}" train.zero_stage=2
    run qwen2-0.5b-z3 --shape qwen2-0.5b "${G[@]}" "${D[@]}" train.zero_stage=3
    run qwen2-0.5b-z3-lora --shape qwen2-0.5b "${G[@]}" "${D[@]}" train.zero_stage=3 model.lora_rank=16
    run qwen2-1.5b-z2 --shape qwen2-1.5b "${G[@]}" "${D[@]}" train.zero_stage=2 train.gradient_checkpointing=true
    run qwen2-1.5b-z3 --shape qwen2-1.5b "${G[@]}" "${D[@]}" train.zero_stage=3 train.gradient_checkpointing=true
    run qwen2-1.5b-z3-offload --shape qwen2-1.5b "${G[@]}" "${D[@]}" train.zero_stage=3 train.offload=all \
        train.gradient_checkpointing=true
fi
ls "$OUT"/*.json 2>/dev/null | wc -l | xargs echo "records:"
[ ! -s "$OUT/failures.txt" ]
