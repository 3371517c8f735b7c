#!/usr/bin/env bash
# The device check, run on a lent GPU machine from the repository root (see bench/RESULTS.md).
#   bash bench/gpu_check.sh [tests|bench|all|big]
# tests: engine and gRPC tests on CUDA (fp32, nf4 and int8 bases against PEFT; the server on the GPU),
#        the Triton LoRA kernel compiled (its parity, then the engine against PEFT with it on),
#        then `loraplex serve --quantize nf4 --device cuda` answering the CLI, on a tiny base.
# bench: the engine benchmark on a SmolLM2-135M-shaped base, bf16 and nf4, and bf16 with the Triton kernel.
# big (alone, not in all): issue 14's Llama-3.1-8B-shaped figures (bench/gpu_big.py), bf16 and nf4, with
#      the torch LoRA path and then the Triton kernel.
# Carried: .whl/ (bitsandbytes, transformers, peft, grpcio*, protobuf wheels for cp312) and, for
# bench, .gpu/smol/ (SmolLM2's config and tokenizer; weights drawn at random, which time the same).
set -uo pipefail
PART=${1:-all}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD/server:$PWD/adapters:$PWD/clients/python:$PWD:$PWD/tests PYTHONUNBUFFERED=1 \
  HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, transformers, peft, bitsandbytes as b, grpc; print('torch', torch.__version__,
'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', b.__version__,
'grpcio', grpc.__version__)" | tee -a "$OUT/device.txt"

if [ "$PART" = big ]; then
  timeout 420 python3 -m bench.gpu_big --work /tmp/big 2>&1 | grep -v -E "Loading weights|Writing model" \
    | tee "$OUT/gpu_big_torch.txt"
  LORAPLEX_TRITON_LORA=1 timeout 300 python3 -m bench.gpu_big --work /tmp/big --quantize none 2>&1 \
    | grep -v -E "Loading weights|Writing model" | tee "$OUT/gpu_big_triton.txt"
  exit 0
fi

if [ "$PART" != bench ]; then
  LORAPLEX_TEST_DEVICE=cuda timeout 300 python3 -m pytest -q -p no:cacheprovider -p no:logging \
    tests/test_engine_vs_peft.py tests/test_generation_behaviour.py tests/test_step_loop.py tests/test_grpc_service.py \
    tests/test_grpc_security.py -k "not not_serving_until" > "$OUT/tests_cuda.txt" 2>&1
  tail -15 "$OUT/tests_cuda.txt"
  LORAPLEX_TEST_DEVICE=cuda timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_triton_lora.py \
    > "$OUT/tests_triton.txt" 2>&1
  LORAPLEX_TRITON_LORA=1 LORAPLEX_TEST_DEVICE=cuda timeout 240 python3 -m pytest -q -p no:cacheprovider \
    tests/test_engine_vs_peft.py tests/test_random_batches_vs_peft.py >> "$OUT/tests_triton.txt" 2>&1
  grep -E "passed|failed|error" "$OUT/tests_triton.txt"
  python3 -c "from pathlib import Path; from tiny_models import make_base; make_base(Path('/tmp/tiny'), 'llama')"
  python3 -m loraplex_server.app.serve --base /tmp/tiny --quantize nf4 --device cuda --metrics-port 0 \
    > "$OUT/serve_nf4.txt" 2>&1 &
  for _ in $(seq 120); do python3 -m loraplex.cli health 2>/dev/null | grep -q "^SERVING" && break; sleep 0.5; done
  python3 -m loraplex.cli generate --max-tokens 8 "hello world" 2>&1 | tee -a "$OUT/serve_nf4.txt"
  kill %1; wait
  grep -E "serving|quantize" "$OUT/serve_nf4.txt"
fi

if [ "$PART" != tests ]; then
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
  LORAPLEX_TRITON_LORA=1 timeout 150 python3 -m bench.engine --device cuda --base /tmp/smol --reps 5 2>&1 \
    | grep -v -E "Loading weights|Writing model" | tee "$OUT/bench_cuda_triton.txt"
fi
