#!/usr/bin/env bash
# Build (or reuse) a Horovod 0.28.1 wheel for the frameworks installed in the
# given venv, with the build fixes today's PyTorch/TensorFlow need, and
# install it there. The wheel is cached outside the checkout, keyed by the
# Horovod, torch, TensorFlow and Python versions and the GPU flag, so a second
# install (e.g. CI's fresh clone) takes seconds.
#
# usage: build_horovod.sh VENV_DIR [GPU=0|1]
set -euo pipefail
export TF_CPP_MIN_LOG_LEVEL=3  # keep TensorFlow's import chatter out of the build log

venv=${1:?usage: build_horovod.sh VENV_DIR [GPU]}
gpu=${2:-0}
py="$venv/bin/python"
horovod_version=0.28.1

versions=$("$py" - <<'PY'
import sys, importlib.metadata as md
def v(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "none"
tf = v("tensorflow-cpu") if v("tensorflow-cpu") != "none" else v("tensorflow")
print(f"torch{v('torch')}-tf{tf}-py{sys.version_info[0]}{sys.version_info[1]}")
PY
)
flavour=$([ "$gpu" = 1 ] && echo cuda || echo cpu)
cache_dir="${HOROVOD_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cnn-parallel/horovod-$horovod_version-$versions-$flavour}"

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
#    and stop) and, killed, leaves ranks that notice (common/launch.LauncherWatch).
patch_horovodrun() {
    "$venv/bin/python" - <<'PATCH'
import horovod.common.util as util
import horovod.runner.mpi_run as mpi_run

MENDS = {
    util.__file__: [("EXTENSIONS = ['tensorflow', 'torch', 'mxnet']", "EXTENSIONS = ['torch', 'tensorflow', 'mxnet']"),
                    ("            sys.stderr = open(os.devnull, 'w')\n",
                     "            sys.stderr = open(os.devnull, 'w')\n"
                     "            os.dup2(sys.stderr.fileno(), 2)  # C++ logging too\n")],
    mpi_run.__file__: [("os.execve('/bin/sh', ['/bin/sh', '-c', mpirun_command], env)",
                        "os.execve('/bin/sh', ['/bin/sh', '-c', 'exec ' + mpirun_command], env)")],
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

if "$py" -c "import horovod, horovod.torch, horovod.tensorflow" 2>/dev/null; then
    echo "horovod: already installed in $venv"
    patch_horovodrun
    exit 0
fi

wheel=$(ls "$cache_dir"/horovod-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
    echo "horovod: building $horovod_version from source for $versions ($flavour); this takes ~6 min on 2 cores"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    "$venv/bin/pip" download -q --no-deps --no-binary :all: "horovod==$horovod_version" -d "$work"
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
    export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_MPI=1 \
           HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MXNET=1
    if [ "$gpu" = 1 ]; then
        export HOROVOD_GPU_OPERATIONS=NCCL
    fi
    export MAKEFLAGS="-j$(nproc)" PATH="$venv/bin:$PATH"
    # The build must see the installed frameworks: no build isolation.
    "$venv/bin/pip" wheel -q --no-build-isolation --no-deps "$src" -w "$work/dist"
    mkdir -p "$cache_dir"
    cp "$work"/dist/horovod-*.whl "$cache_dir/"
    wheel=$(ls "$cache_dir"/horovod-*.whl | head -1)
    echo "horovod: cached $wheel"
fi

"$venv/bin/pip" install -q --no-deps "$wheel"
patch_horovodrun
report=$("$venv/bin/horovodrun" --check-build)
echo "$report"
for feature in PyTorch TensorFlow MPI Gloo; do
    if ! grep -q "\[X\] $feature" <<<"$report"; then
        echo "horovod: the installed build lacks $feature support; delete $cache_dir and rerun make install" >&2
        exit 1
    fi
done
