#!/usr/bin/env bash
# Build FlashAttention-3's forward (Hopper sm90a, head size 128, bf16 and FP8) from its sources:
# the build the fp8 benchmarks ran (`kernels.fa3_fp8_attention`). FA3 is not on PyPI.
#
#   benchmarks/build_fa3.sh SRC DEST [OBJ]
#
# SRC: a flash-attention checkout (hopper/ and csrc/cutlass/include). DEST gets
# flash_attn_interface.py, flash_attn_config.py and flash_attn_3/ (with _C.abi3.so): put DEST
# on PYTHONPATH. OBJ: where the CUDA objects go, or already are (compile them on another
# machine with the same CUDA major and carry them; the link then takes ~10 s). Needs nvcc
# (CUDA 12.3+), g++ and the torch (2.9+) the extension will run under.
#
# OBJECTS_ONLY=1: compile the objects and stop, e.g. on a machine without a GPU or CUDA torch,
# with nvcc from NVIDIA's wheels (checked with CUDA 13.0 for torch 2.11+cu130: 1:44 and 4.5 GB
# per kernel instantiation on 2 cores; the link on the GPU machine took 11 s):
#   pip download --no-deps -d w nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 \
#     nvidia-cuda-cccl==13.0.85 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
#   for f in w/*.whl; do unzip -qo "$f" -d cu; done; chmod +x cu/nvidia/cu13/bin/* cu/nvidia/cu13/nvvm/bin/*
#   CUDA_HOME=$PWD/cu/nvidia/cu13 OBJECTS_ONLY=1 benchmarks/build_fa3.sh SRC DEST OBJ
#
# PTXAS=/path/to/ptxas (optional): assemble the kernels with that ptxas under a CUDA 13 nvcc,
# e.g. 12.8.93, which FA3's own setup.py uses ("gives the best perf currently"): Triton 3.6
# bundles it (triton/backends/nvidia/bin/ptxas), as does the nvidia-cuda-nvcc-cu12==12.8.93
# wheel. nvcc then runs from a copy of its bin/ whose ptxas lowers the PTX ISA version
# (9.x -> 8.7) and calls PTXAS. benchmarks/fa3_builds.py times builds against each other.
set -euo pipefail
if [ $# -lt 2 ]; then echo "usage: $0 SRC DEST [OBJ]" >&2; exit 2; fi
SRC=$(realpath "$1"); DEST=$(realpath -m "$2"); OBJ=$(realpath -m "${3:-$DEST/obj}")
H=$SRC/hopper
mkdir -p "$DEST/flash_attn_3" "$OBJ"
# Everything but the non-causal forward at head size 128 is left out: the DiT needs no more.
OFF="BACKWARD SPLIT PAGEDKV APPENDKV LOCAL SOFTCAP PACKGQA FP16 VARLEN CLUSTER HDIM64 HDIM96
     HDIM192 HDIM256 SM8x HDIMDIFF64 HDIMDIFF192"
FLAGS=$(for f in $OFF; do printf -- "-DFLASHATTENTION_DISABLE_%s " "$f"; done)
CUDA=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")}
INC="-I$H -I$SRC/csrc/cutlass/include -I$CUDA/include -I$CUDA/include/cccl"
NVCC=$CUDA/bin/nvcc
if [ -n "${PTXAS:-}" ]; then
  PTXAS=$(realpath "$PTXAS")
  overlay=$(mktemp -d)
  trap 'rm -rf "$overlay"' EXIT
  mkdir "$overlay/bin"
  for d in include lib lib64 nvvm; do [ -e "$CUDA/$d" ] && ln -s "$CUDA/$d" "$overlay/$d"; done
  for f in "$CUDA"/bin/*; do
    case $(basename "$f") in
      ptxas) ;;
      nvcc|nvcc.profile) cp "$f" "$overlay/bin/" ;;  # nvcc finds its tools beside itself
      *) ln -s "$f" "$overlay/bin/" ;;
    esac
  done
  {
    echo '#!/usr/bin/env bash'
    echo 'args=()'
    echo 'for a in "$@"; do'
    echo '  if [[ $a == *.ptx ]]; then'
    echo '    sed -E "s/^\.version 9\.[0-9]+/.version 8.7/" "$a" > "$a.v87"; args+=("$a.v87")'
    echo '  else args+=("$a"); fi'
    echo 'done'
    echo "exec $PTXAS \"\${args[@]}\""
  } > "$overlay/bin/ptxas"
  chmod +x "$overlay/bin/ptxas"
  NVCC=$overlay/bin/nvcc
fi
for unit in instantiations/flash_fwd_hdim128_e4m3_sm90 instantiations/flash_fwd_hdim128_bf16_sm90 \
            flash_prepare_scheduler; do
  o=$OBJ/$(basename "$unit").o
  [ -s "$o" ] && continue
  echo "nvcc $unit.cu" >&2
  # shellcheck disable=SC2086
  "$NVCC" -c "$H/$unit.cu" -o "$o.tmp" $INC $FLAGS -O3 -std=c++17 --use_fast_math \
    --expt-relaxed-constexpr -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
    -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
    -DCUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED -DCUTLASS_ENABLE_GDC_FOR_SM90 \
    -DCUTLASS_DEBUG_TRACE_LEVEL=0 -DNDEBUG -gencode arch=compute_90a,code=sm_90a -Xcompiler -fPIC
  mv "$o.tmp" "$o"
done
if [ -n "${OBJECTS_ONLY:-}" ]; then echo "objects: $OBJ" >&2; exit 0; fi
read -r TORCH PYINC < <(python3 -c "import sysconfig, torch, os; \
print(os.path.dirname(torch.__file__), sysconfig.get_paths()['include'])")
echo "g++ flash_api_stable.cpp, link" >&2
# shellcheck disable=SC2086
g++ -shared -fPIC -O3 -std=c++17 -DPy_LIMITED_API=0x03090000 -DUSE_CUDA \
  -DTORCH_TARGET_VERSION=0x0209000000000000 $FLAGS $INC -I"$TORCH/include" -I"$PYINC" \
  "$H/flash_api_stable.cpp" "$OBJ"/flash_fwd_hdim128_{e4m3,bf16}_sm90.o \
  "$OBJ"/flash_prepare_scheduler.o -o "$DEST/flash_attn_3/_C.abi3.so" \
  -L"$TORCH/lib" -ltorch -ltorch_cpu -ltorch_cuda -lc10 -lc10_cuda \
  -L"$CUDA/lib64" -lcudart -Wl,-rpath,"$TORCH/lib"
cp "$H/flash_attn_interface.py" "$DEST/"
cp "$H/flash_attn_3/__init__.py" "$H/flash_attn_3/flash_attn_config.py" "$DEST/flash_attn_3/"
python3 - "$DEST/flash_attn_config.py" $OFF <<'EOF'
import sys
off = set(sys.argv[2:])
names = ["BACKWARD", "SPLIT", "PAGEDKV", "APPENDKV", "LOCAL", "SOFTCAP", "PACKGQA", "FP16", "FP8",
         "VARLEN", "CLUSTER", "HDIM64", "HDIM96", "HDIM128", "HDIM192", "HDIM256", "SM8x"]
flags = {f"FLASHATTENTION_DISABLE_{n}": n in off for n in names}
flags.update({"FLASHATTENTION_ENABLE_VCOLMAJOR": False, "FLASH_ATTENTION_DISABLE_HDIMDIFF64": True,
              "FLASH_ATTENTION_DISABLE_HDIMDIFF192": True})
with open(sys.argv[1], "w") as f:
    f.write(f"CONFIG = {{'build_flags': {flags!r}}}\n")
EOF
echo "built: $DEST" >&2
