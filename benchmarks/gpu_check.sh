#!/usr/bin/env bash
# GPU check: the GPU parity tests, then a GPU training-speed table. Needs a CUDA device and
# this package installed with its extras, built for the machine's CUDA:
#     pip install -e '.[dev,bench,cuda]'
# Without mamba-ssm the fused-kernel tests skip and our scan runs in PyTorch on the GPU.
# Budget: about 5 minutes (the tests take under a minute; the table is capped by
# --max-seconds per case and by `timeout` as a whole).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"

"$PYTHON" - <<'EOF'
import torch
from samba.model.backend import cuda_kernels_error
if not torch.cuda.is_available():
    raise SystemExit("no CUDA device: run this on a GPU machine")
print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
error = cuda_kernels_error()
print("mamba-ssm kernels: " + ("available" if error is None else f"not available ({error})"))
EOF

echo "== GPU parity tests"
timeout 180 "$PYTHON" -m pytest -q -rs tests/test_gpu.py

echo "== GPU training speed (fp32, d_model 256, 4 layers, vocab 10000)"
common=(--device cuda --steps 20 --warmup 3 --max-seconds 10 --timeout 60)
timeout 150 "$PYTHON" benchmarks/train_speed.py "${common[@]}" --backend auto \
    --cases ours-baseline,ours-samba,mambapy,transformers --shapes 8x128,32x512
echo "== our scan in PyTorch on the GPU (backend torch), for comparison"
timeout 60 "$PYTHON" benchmarks/train_speed.py "${common[@]}" --backend torch \
    --cases ours-baseline,ours-samba --shapes 32x512
