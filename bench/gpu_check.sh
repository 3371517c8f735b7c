#!/usr/bin/env bash
# The device check, run on a lent GPU machine from the repository root (see bench/RESULTS.md):
#   engine tests on CUDA (bf16/fp32, nf4 and int8 bases against PEFT on the same base), then the
#   engine benchmark on a SmolLM2-135M-shaped base, bf16 and nf4. Results land in $OUT.
# Carried: .whl/ (bitsandbytes, transformers, peft wheels) and .gpu/smol/ (SmolLM2's config and
# tokenizer; the weights are drawn at random there, which times the same as the real ones).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD/server:$PWD/adapters:$PWD/clients/python:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, transformers, peft, bitsandbytes as b; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', b.__version__)" | tee -a "$OUT/device.txt"

LORAPLEX_TEST_DEVICE=cuda timeout 240 python3 -m pytest -q -p no:cacheprovider -p no:logging \
  tests/test_engine_vs_peft.py tests/test_generation_behaviour.py > "$OUT/tests_cuda.txt" 2>&1; tail -15 "$OUT/tests_cuda.txt"

python3 - <<'PY'
import shutil, torch
from transformers import AutoConfig, AutoModelForCausalLM
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(".gpu/smol"), dtype=torch.bfloat16)
model.save_pretrained("/tmp/smol")
for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
    shutil.copy(f".gpu/smol/{name}", "/tmp/smol/")
PY
for quant in none nf4; do
  timeout 150 python3 -m bench.engine --device cuda --base /tmp/smol --quantize $quant --reps 5 2>&1 \
    | grep -v -E "Loading weights|Writing model" | tee "$OUT/bench_cuda_$quant.txt"
done
