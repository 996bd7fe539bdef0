#!/usr/bin/env bash
# Build the offline bundle for a GPU node without internet whose image has CUDA torch, transformers,
# tokenizers and pyarrow but no ray, deepspeed or mlflow (../shared/notes/gpu-node.md): at most 64 MiB.
#
#   make wheelhouse                  # -> .wheelhouse/ (WHEELHOUSE=dir, NODE_PY=3.12 to change)
#
# Contents: ray as a slim tar.xz (the wheel without ray/jars, ray/rllib, the dashboard's web build),
# deepspeed built here (pure Python; ops JIT-compile on the node), mlflow-skinny and the other wheels
# ray/deepspeed/mlflow need that such an image lacks, MiniLM's tokenizer files
# (the random-init shapes of jobs.bench_train read its vocabulary; no weights) and install_and_bench.sh.
# bundlerec itself is not in it: the node runs from a copy of this repository.
set -euo pipefail
OUT=${1:-.wheelhouse}
PYV=${NODE_PY:-3.12}
TAG=cp${PYV/./}
PLAT=${NODE_PLATFORM:-manylinux_2_28_x86_64}
RAY_VERSION=$(python3 - <<'PY'
import re; print(re.search(r"^ray==([^\s;]+)", open("requirements.lock").read(), re.M).group(1).split("+")[0])
PY
)
DS_VERSION=$(grep -E '^deepspeed==' requirements.lock | head -1 | cut -d= -f3)
PIP="${PIP:-python3 -m pip}"
rm -rf "$OUT" && mkdir -p "$OUT/wheels"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

MLFLOW_VERSION=$(grep -E '^mlflow-skinny==' requirements.lock | cut -d= -f3)
# what such an image already has (../shared/notes/gpu-node.md): not carried
NODE_HAS='^(torch|triton|nvidia_.*|numpy|pandas|pyarrow|transformers|tokenizers|safetensors|huggingface_hub|hf_xet|scipy|scikit_learn|tqdm|rich|typer|pytest|pygments|markdown_it_py|mdurl|requests|urllib3|idna|certifi|charset_normalizer|pyyaml|filelock|packaging|fsspec|python_dateutil|pytz|tzdata|six|typing_extensions|jinja2|markupsafe|sympy|mpmath|networkx|regex|setuptools)-'

echo "== ray $RAY_VERSION[train,data] + mlflow-skinny $MLFLOW_VERSION + deepspeed's dependencies, for $TAG ($PLAT)"
$PIP download -q --only-binary=:all: --python-version "$PYV" --platform "$PLAT" --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --implementation cp -d "$tmp/all" \
    "ray[train,data]==$RAY_VERSION" "mlflow-skinny==$MLFLOW_VERSION" hjson ninja py-cpuinfo einops msgpack psutil "pydantic>=2"
for w in "$tmp"/all/*.whl; do
    b=$(basename "$w")
    if [[ "$b" == ray-* ]]; then continue; fi
    if [[ "$(echo "$b" | tr 'A-Z.' 'a-z_' | sed 's/_whl$//')" =~ $NODE_HAS ]]; then continue; fi
    cp "$w" "$OUT/wheels/"
done

echo "== ray: slim archive (no jars, rllib, dashboard web build)"
mkdir -p "$tmp/ray" && (cd "$tmp/ray" && python3 -m zipfile -e "$tmp"/all/ray-*.whl .)
rm -rf "$tmp/ray/ray/jars" "$tmp/ray/ray/rllib" "$tmp/ray/ray/dashboard/client/build"
find "$tmp/ray" -name "__pycache__" -prune -exec rm -rf {} +
XZ_OPT=-9 tar -C "$tmp/ray" -cJf "$OUT/ray-$RAY_VERSION-$TAG-slim.tar.xz" .

echo "== deepspeed $DS_VERSION (built here: pure Python, its ops JIT-compile on the node)"
DS_BUILD_OPS=0 $PIP wheel -q --no-deps -w "$OUT/wheels" "deepspeed==$DS_VERSION"

echo "== MiniLM tokenizer (vocabulary for the random-init shapes; no weights)"
.venv/bin/python - "$OUT/tokenizer" <<'PY'
import sys
from transformers import AutoConfig
from bundlerec.model.pretrained import load_tokenizer, resolve_model_path
src = resolve_model_path("all-MiniLM-L6-v2")
load_tokenizer(src).save_pretrained(sys.argv[1])
AutoConfig.from_pretrained(src).save_pretrained(sys.argv[1])  # a model folder's shape; the weights stay here
PY
cp cluster/gpu-node/install_and_bench.sh "$OUT/"
size=$(du -sb "$OUT" | cut -f1)
echo "wheelhouse: $OUT, $((size / 1048576)) MiB ($size bytes)"
if [ "$size" -gt $((64 * 1048576)) ]; then echo "wheelhouse is over 64 MiB" >&2; exit 1; fi
