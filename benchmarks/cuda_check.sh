#!/usr/bin/env bash
# The CUDA execution provider check (issue 14), one shot, on a fresh GPU machine without network.
#
#   bash benchmarks/cuda_check.sh pack WHEEL_DIR PARTS_DIR    # here: pack onnxruntime-gpu for the trip
#   bash benchmarks/cuda_check.sh [cuda_check.py options]      # there: install, then run the check
#
# "pack" turns the onnxruntime-gpu wheel in WHEEL_DIR (onnxruntime_gpu-*.whl; 1.31.1: 256 MB, built for CUDA 13) into
# an xz-compressed tar of its package folder, split into 60 MB parts in PARTS_DIR (the TensorRT provider and the C
# API library, which Python does not load, are left out: 186 MB in all), so that it can travel in pieces of a size a
# transfer allows; the transformers wheel in WHEEL_DIR is copied beside the parts.
#
# Run without "pack", it installs onnxruntime-gpu from $MONE_ORT_PARTS (default /tmp/ortparts: ort-gpu.tar.xz.part*)
# or from a wheel in $MONE_WHEELS (default .whl), and transformers from a wheel there when the image's version is not
# the pinned one, into /tmp/mone-site; points the dynamic loader at the CUDA 13 libraries of the image's Python
# (the nvidia-* packages PyTorch brings: cuBLAS, cuDNN, cuRAND, cuFFT, the CUDA runtime); then runs
# benchmarks/cuda_check.py, which writes cuda_check.json into $OUT (default ./cuda-check-out).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "pack" ]; then
    wheels=$(realpath "$2"); parts=$(realpath -m "$3")
    mkdir -p "$parts"
    stage=$(mktemp -d)
    (cd "$stage" && unzip -q "$wheels"/onnxruntime_gpu-*.whl &&
        rm -f onnxruntime/capi/libonnxruntime_providers_tensorrt.so onnxruntime/capi/libonnxruntime.so.* &&
        tar -c onnxruntime onnxruntime_gpu-*.dist-info | xz -9e -T0 | split -b 60M -d - "$parts/ort-gpu.tar.xz.part")
    cp "$wheels"/transformers-*.whl "$parts"/ 2>/dev/null || true
    rm -rf "$stage"
    ls -l "$parts"
    exit 0
fi

site=/tmp/mone-site
parts=${MONE_ORT_PARTS:-/tmp/ortparts}
wheels=${MONE_WHEELS:-.whl}
OUT=${OUT:-$PWD/cuda-check-out}
mkdir -p "$site" "$OUT"
python=python3

if [ ! -d "$site/onnxruntime" ]; then
    if ls "$parts"/ort-gpu.tar.xz.part* >/dev/null 2>&1; then
        cat "$parts"/ort-gpu.tar.xz.part* | xz -dc | tar -x -C "$site"
    else
        $python -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/onnxruntime_gpu-*.whl
    fi
fi
pinned=$(sed -n 's/.*"transformers>=\([0-9]*\.[0-9]*\).*/\1/p' pyproject.toml)   # major.minor, e.g. 5.24
have=$($python -c 'import transformers; print(".".join(transformers.__version__.split(".")[:2]))' 2>/dev/null || true)
if [ "$have" != "$pinned" ] && [ ! -d "$site/transformers" ]; then
    wheel=$(ls "$parts"/transformers-*.whl "$wheels"/transformers-*.whl 2>/dev/null | head -1)
    $python -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheel"
fi

# The CUDA 13 libraries onnxruntime-gpu links against, from the image's nvidia-* Python packages (and the toolkit).
libs=$($python - <<'EOF'
import glob, os, site
dirs = set()
for root in site.getsitepackages():
    for lib in glob.glob(os.path.join(root, "nvidia", "**", "*.so*"), recursive=True):
        dirs.add(os.path.dirname(lib))
print(":".join(sorted(dirs)))
EOF
)
[ -d /usr/local/cuda/lib64 ] && libs="$libs:/usr/local/cuda/lib64"
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
$python -c 'import onnxruntime as ort, transformers; print("onnxruntime", ort.__version__, ort.get_available_providers(), "transformers", transformers.__version__)'
exec $python benchmarks/cuda_check.py --out "$OUT" "$@"
