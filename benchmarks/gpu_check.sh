#!/usr/bin/env bash
# The CUDA paths in one call: train, search, learn, assemble and evaluate on the GPU, check the fold, time training.
#
#   bash benchmarks/gpu_check.sh                          # the embedded SmolLM2-135M (needs it in the loradem cache)
#   bash benchmarks/gpu_check.sh --stand-in-from .gpu/smollm2 --out /tmp/gpu-check
#   bash benchmarks/gpu_check.sh --base tests/some-tiny-model --steps 2    # CPU only: what CI runs (tests/test_gpu_check.py)
#   bash benchmarks/gpu_check.sh --compare MODEL_DIR_A MODEL_DIR_B         # the fold comparison alone
#
# With CUDA (a lent H200 or any GPU), in this order, each step's wall time printed:
#   1. `loradem run` on a generated recipe (addition and sort from the demo data, --steps steps each, 16
#      validation and 16 test rows per source): the adapters train on a bf16 base; the variant `nf4` trains
#      the same sources as QLoRA on an NF4 base (bitsandbytes); then a 3-trial search, learned per-module
#      weights (--learn-steps), the assembly of the learned weights and the evaluation of every row
#      (exact match; no lm-eval, no retention). Each adapter's device, quantization and tokens/s are listed.
#   2. the fold check: the same recipe assembled again in a process that sees no GPU (CUDA_VISIBLE_DEVICES=),
#      compared with the model the GPU run wrote: every weight file byte-identical and every tensor equal, or
#      the script fails. (The assembly's exact float64 fold is CPU code; the search's and evaluation's in-memory
#      folds run on the GPU in float32 and are not bit-comparable with it.)
#   3. training tokens/s of loradem against plain TRL on the GPU: benchmarks/bench_train.py --device cuda
#      (variants loradem, trl, trl-matched, trl-padding-free; --bench-steps steps each).
# Without CUDA it runs 1 and 2 on the CPU (same code paths, NF4 through bitsandbytes' CPU kernels) and says
# which CUDA parts it skipped; with the default --steps 2 that takes a couple of minutes on SmolLM2.
#
# A borrowed GPU machine often has its own CUDA torch, no package registry and little room for files: the
# 517 MB float32 base and the 98 MB GGUF it is converted from may not fit. --stand-in-from DIR builds a base of
# the real one's exact shape with seeded random weights from DIR's config and tokenizer files (a few MB; make
# DIR with `mkdir -p .gpu/smollm2 && cp ~/.cache/loradem/bases/smollm2-135m-instruct/{config.json,
# generation_config.json,tokenizer.json,tokenizer_config.json,chat_template.jinja} .gpu/smollm2/`, and
# `echo /.gpu/ >> .git/info/exclude`): tokens/s, QLoRA and the fold check are as valid on it as on the real
# weights; its exact-match scores mean nothing. Python: $PYTHON, else .venv/bin/python where it exists, else
# python3 (such a machine's, with loradem's other dependencies installed from the ~28 MB of wheels that
# benchmarks/offline_wheels.sh downloads).
# Budget on an H200 (measured 2026-12-04, benchmarks/RESULTS.md): about 7 minutes; the pipeline 2 min, the fold
# check 11 s, bench_train.py's four variants about 45 s each.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"
else PY=python3; fi
[[ "$PY" == */* ]] && PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # the script cds into --out
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

BASE=smollm2-135m STEPS="" LEARN_STEPS=4 BENCH_STEPS=60 OUT_DIR="" STAND_IN=""
usage() { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

compare() {  # compare DIR_A DIR_B: the same files, byte-identical, and every safetensors tensor equal
  "$PY" - "$1" "$2" <<'EOF'
import hashlib, sys
from pathlib import Path
import torch
from safetensors.torch import load_file

a, b = Path(sys.argv[1]), Path(sys.argv[2])
names = lambda d: sorted(p.name for p in d.glob("*.safetensors"))
if not names(a) or names(a) != names(b):
    sys.exit(f"fold check FAILED: weight files differ: {a}: {names(a)}; {b}: {names(b)}")
tensors = 0
for name in names(a):
    ta, tb = load_file(str(a / name)), load_file(str(b / name))
    unequal = sorted(k for k in ta.keys() | tb.keys() if k not in ta or k not in tb or not torch.equal(ta[k], tb[k]))
    if unequal:
        sys.exit(f"fold check FAILED: {name}: {len(unequal)} tensor(s) differ, e.g. {unequal[0]}")
    if hashlib.sha256((a / name).read_bytes()).digest() != hashlib.sha256((b / name).read_bytes()).digest():
        sys.exit(f"fold check FAILED: {name}: equal tensors but different bytes")
    tensors += len(ta)
print(f"fold check: {len(names(a))} weight file(s) byte-identical, {tensors} tensors equal ({a} == {b})")
EOF
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --base) BASE="$2"; shift 2;;
    --stand-in-from) STAND_IN="$2"; shift 2;;
    --steps) STEPS="$2"; shift 2;;
    --learn-steps) LEARN_STEPS="$2"; shift 2;;
    --bench-steps) BENCH_STEPS="$2"; shift 2;;
    --out) OUT_DIR="$2"; shift 2;;
    --compare) [[ $# -eq 3 ]] || usage; compare "$2" "$3"; exit;;
    -h|--help) usage;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; usage;;
  esac
done

CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
STEPS=${STEPS:-$([[ $CUDA == 1 ]] && echo 30 || echo 2)}
OUT_DIR=${OUT_DIR:-$(mktemp -d /tmp/loradem-gpu-check.XXXXXX)}
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG() { printf '\n== %s (%s)\n' "$1" "$(date +%T)"; }
T0=$(date +%s)

LOG "environment"
"$PY" - <<'EOF'
import importlib.metadata as md, platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, " + ", ".join(
    f"{p} {md.version(p)}" for p in ("transformers", "peft", "trl", "bitsandbytes", "accelerate")))
print(f"CUDA: {torch.cuda.get_device_name(0)} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
      if torch.cuda.is_available() else "CUDA: none")
EOF
if [[ $CUDA != 1 ]]; then
  echo "no CUDA device: running the CPU parts only (the pipeline and the fold check on the CPU);"
  echo "SKIPPED: bf16 and NF4 training on CUDA, and the GPU tokens/s of loradem vs plain TRL (bench_train.py --device cuda)"
fi

if [[ -n "$STAND_IN" ]]; then
  LOG "stand-in base from $STAND_IN (its config and tokenizer, seeded random weights)"
  "$PY" - "$STAND_IN" "$OUT_DIR/base" <<'EOF'
import shutil, sys
from pathlib import Path
import torch
from transformers import AutoConfig, AutoModelForCausalLM

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.float32)
model.save_pretrained(dst)
for f in src.iterdir():
    if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
        shutil.copy(f, dst / f.name)
print(f"{dst}: {sum(p.numel() for p in model.parameters()):,} parameters")
EOF
  BASE="$OUT_DIR/base"
fi

cd "$OUT_DIR"
cat > gpu-check.yaml <<EOF
name: gpu-check
base: $BASE
seed: 0
lora: {r: 8, alpha: 16, dropout: 0.0, target_modules: all-linear}
train: {learning_rate: 1.0e-3, max_steps: $STEPS, eval_steps: $STEPS, batch_size: 8, max_length: 128, quantization: none}
sources:
  - {name: addition, data: $ROOT/recipes/data/demo/addition.jsonl, validation: 16, test: 16}
  - {name: sort, data: $ROOT/recipes/data/demo/sort.jsonl, validation: 16, test: 16}
search: {n_trials: 3, max_rows_per_source: 8, batch_size: 8}
learn: {enabled: true, steps: $LEARN_STEPS, eval_every: $LEARN_STEPS, rows_per_source: 16}
assemble: {weights: learned}
eval: {max_new_tokens: 16, batch_size: 16, retention: {enabled: false}}
variants:
  - name: nf4
    description: the same sources trained as QLoRA on an NF4 base
    train: {quantization: nf4}
EOF

LOG "1. loradem run ($STEPS steps per adapter, $([[ $CUDA == 1 ]] && echo CUDA || echo CPU))"
T=$(date +%s)
"$PY" -m loradem run gpu-check.yaml
echo "run: $(( $(date +%s) - T )) s"
"$PY" - <<'EOF'
import json
from pathlib import Path

for listing in (Path("runs/gpu-check/adapters.json"), Path("runs/gpu-check/variants/nf4/adapters.json")):
    for source, entry in json.loads(listing.read_text()).items():
        record = json.loads((listing.parent / entry["path"] / "loradem-train.json").read_text())
        print(f"{source}: quantization {record['train']['quantization']}, device {record['device']}, "
              f"{record['train_tokens']:,} tokens in {record['train_seconds']:.1f} s ({record['tokens_per_second']} tok/s), "
              f"best val loss {record['best_val_loss']:.4f}")
EOF
awk '/^\| model/ {on = 1} on && /^$/ {exit} on' runs/gpu-check/report.md  # the first table: exact match

LOG "2. fold check: the run's model against the same recipe assembled with no GPU visible"
T=$(date +%s)
CUDA_VISIBLE_DEVICES= "$PY" -m loradem assemble gpu-check.yaml --out model-cpu --overwrite
compare runs/gpu-check/model model-cpu
echo "fold check: $(( $(date +%s) - T )) s"

if [[ $CUDA == 1 ]]; then
  LOG "3. training tokens/s on the GPU: loradem vs plain TRL ($BENCH_STEPS steps each)"
  "$PY" "$ROOT/benchmarks/bench_train.py" --device cuda --base "$BASE" --steps "$BENCH_STEPS" \
    --variants loradem,trl,trl-matched,trl-padding-free --json "$OUT_DIR/bench_train.json"
else
  LOG "3. SKIPPED (no CUDA): GPU tokens/s; on a CPU run bench_train.py under the heavy lock instead"
fi
echo
echo "gpu_check: all checks passed in $(( $(date +%s) - T0 )) s; outputs in $OUT_DIR"
