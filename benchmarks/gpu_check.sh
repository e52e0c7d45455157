#!/usr/bin/env bash
# Issue #20's GPU measurements, everything the README's Table A.3 paragraph needs, in one run
# of about 5-8 minutes on one H200 (fits a 10-minute cap): ViT-L-14-336 at 518 px with a random
# init (no weights, nothing downloaded), batch 8.
#
#   bash benchmarks/gpu_check.sh                 # from the repository root or anywhere
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh
#
# Prints: the machine; every method's ms/img, peak GPU memory and ratio to APRIL-GAN in fp32;
# APRIL-GAN and Bayes-PFL under fp16 autocast and their ratio; Bayes-PFL with map_std; the
# fp16 maps' difference from fp32; pfl's maps against the straightforward reference (exit 1 on
# a mismatch); then the same under bf16 (peers skipped, no reference); then Bayes-PFL with its
# maps from the compiled kernel (map_kernel="compiled"), checked against the fused maps.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c "import open_clip" 2>/dev/null; then
    echo "open_clip is not importable by $PY: pip install open_clip_torch==3.3.0, or put a" \
         "folder holding open_clip, ftfy and wcwidth on PYTHONPATH" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
"$PY" -c "import torch, open_clip; print('torch', torch.__version__, '| CUDA', torch.version.cuda,
'| open_clip', open_clip.__version__, '|', torch.cuda.get_device_name(0))"

status=0
echo; echo "=== fp32 (all methods) + fp16 autocast + map_std + reference ==="
timeout 420 "$PY" benchmarks/inference.py --profile paper-random --device cuda --batch 8 \
    --repeats 5 --half fp16 --map-std --interleaved 5 || status=$?
echo; echo "=== bf16 autocast (APRIL-GAN and Bayes-PFL only) ==="
timeout 150 "$PY" benchmarks/inference.py --profile paper-random --device cuda --batch 8 \
    --repeats 5 --half bf16 --methods APRIL-GAN --no-reference || status=$?
echo; echo "=== compiled maps (torch.compile, Triton): APRIL-GAN and Bayes-PFL ==="
timeout 240 "$PY" benchmarks/inference.py --profile paper-random --device cuda --batch 8 \
    --repeats 5 --compiled-maps --methods APRIL-GAN --interleaved 5 --no-reference || status=$?
echo; echo "gpu_check exit status $status"
exit $status
