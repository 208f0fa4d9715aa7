#!/usr/bin/env bash
# Wheels for running loradem on a GPU machine that has a CUDA PyTorch but no package registry.
#
#   bash benchmarks/offline_wheels.sh                        # -> .whl/, for CPython 3.12, bitsandbytes for CUDA 13.0
#   bash benchmarks/offline_wheels.sh --python 3.11 --cuda 126 --out /tmp/wheels
#
# Then, on that machine, from the repository root:
#   python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   bash benchmarks/gpu_check.sh --stand-in-from .gpu/smollm2
#
# It downloads, without dependencies, loradem's pinned libraries (the `==` pins in pyproject.toml) and what
# those need beyond a machine learning image's usual contents (torch, numpy, pandas, pyarrow, accelerate,
# huggingface_hub, tokenizers, safetensors, PyYAML, tqdm, matplotlib): optuna's SQLAlchemy, alembic, Mako and
# colorlog; TRL's datasets with dill, multiprocess and fsspec; pydantic. That list was checked against one image
# (an H200's, 2026-12-04); another may lack more, which shows as an ImportError naming it.
# bitsandbytes' wheel ships a library for every CUDA and ROCm version (43 MB); only the --cuda one and the
# CPU one are kept, which brings the whole set to about 28 MB.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYVER=3.12 CUDA=130 OUT="$ROOT/.whl"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --python) PYVER="$2"; shift 2;;
    --cuda) CUDA="$2"; shift 2;;
    --out) OUT="$2"; shift 2;;
    -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0;;
    *) echo "offline_wheels.sh: unknown argument $1" >&2; exit 2;;
  esac
done

PINNED=$(python3 - "$ROOT/pyproject.toml" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
deps = text.split("dependencies = [", 1)[1].split("]", 1)[0]
print(" ".join(re.findall(r'"([A-Za-z0-9_.-]+==[^"]+)"', deps)))
EOF
)
# datasets 4.8: datasets 5 wants pyarrow >= 24, newer than such images tend to hold
EXTRA='alembic mako colorlog sqlalchemy datasets==4.8.* dill<0.4.2 multiprocess<0.70.20 fsspec==2026.2.0
       pydantic pydantic-core annotated-types typing-inspection typing-extensions'
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64 any; do PLATFORMS+=(--platform "$p"); done

mkdir -p "$OUT"
set -f  # the specs below (transformers==5.24.*) are pip's patterns, not the shell's
# lm_eval is only imported by the lm-eval benchmarks; gguf only by GGUF bases and export
for spec in $PINNED $EXTRA; do
  [[ $spec == lm_eval* ]] && continue
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${PLATFORMS[@]}" -d "$OUT" "$spec" 2>&1 | grep -v '^WARNING: Location' || true
done
set +f
# pydantic-core must be the exact version pydantic asks for
CORE=$(unzip -p "$OUT"/pydantic-2*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==//p')
rm -f "$OUT"/pydantic_core-*.whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${PLATFORMS[@]}" -d "$OUT" "pydantic-core==$CORE" 2>&1 | grep -v '^WARNING: Location' || true

python3 - "$OUT" "$CUDA" <<'EOF'
import re, sys, zipfile
from pathlib import Path

out, cuda = Path(sys.argv[1]), sys.argv[2]
for wheel in out.glob("bitsandbytes-*.whl"):
    drop = re.compile(rf"libbitsandbytes_(cuda(?!{cuda}\.)|rocm|xpu)")
    with zipfile.ZipFile(wheel) as zin:
        names = [i.filename for i in zin.infolist()]
        if not any(f"libbitsandbytes_cuda{cuda}." in n for n in names):
            sys.exit(f"{wheel.name}: no library for CUDA {cuda}; it has "
                     + ", ".join(sorted(re.findall(r"cuda\d+", " ".join(names)))))
        slim = wheel.with_suffix(".slim")
        with zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as zout:
            for info in zin.infolist():
                if drop.search(info.filename):
                    continue
                data = zin.read(info)
                if info.filename.endswith(".dist-info/RECORD"):  # list only what the wheel still holds
                    data = b"".join(l for l in data.splitlines(keepends=True) if not drop.search(l.decode()))
                zout.writestr(info, data)
    slim.replace(wheel)
EOF
ls "$OUT"
du -sh "$OUT"
