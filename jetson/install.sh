#!/usr/bin/env bash
# Install edge-rwkv on a Jetson as a systemd service.
#
#   sudo jetson/install.sh [--model PATH] [--port N] [--power-mode NAME | --maxn] [--no-service] [--no-jtop]
#                          [--torch-index URL --torch-version VERSION]
#
#   --model PATH        model to serve (copied to /opt/edge-rwkv/models/model.safetensors, read-only to the daemon)
#   --port N            HTTP port on 127.0.0.1 (default 8000)
#   --power-mode NAME   nvpmodel mode by its name in /etc/nvpmodel.conf (e.g. MAXN, MAXN_SUPER, 25W)
#   --maxn              the module's fastest mode: MAXN_SUPER where it exists, else MAXN
#   --no-service        install the software only;  --no-jtop: skip jetson-stats
#   --torch-index/--torch-version   a PyTorch wheel index and version of your own, both or neither
#
# JetPack 6.1/6.2 (L4T R36.4, Ubuntu 22.04, Python 3.10, CUDA 12.6) and JetPack 7 (L4T R38 and later,
# Ubuntu 24.04, Python 3.12, CUDA 13.0). CUDA comes from JetPack; PyTorch from the Jetson AI Lab index
# pinned in jetson/torch-jpN.txt (never PyPI's aarch64 build, which does not drive a Jetson's GPU); the
# rest from PyPI as pinned in jetson/requirements-jpN.txt. Exits non-zero unless torch sees the GPU.
set -euo pipefail

PREFIX=/opt/edge-rwkv
DATA=/var/lib/edge-rwkv
MODELS="$PREFIX/models"
SERVICE_USER=edge-rwkv

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }
die() { echo "install.sh: error: $*" >&2; exit 1; }
bad_usage() { echo "install.sh: error: $*" >&2; echo "install.sh: see --help" >&2; exit 2; }
note() { echo "install.sh: $*" >&2; }

# need_value OPTION [VALUE]: an option's value is present and is not the next option
need_value() {
  if [ $# -lt 2 ] || [ -z "$2" ] || [ "${2#--}" != "$2" ]; then
    bad_usage "$1 needs a value"
  fi
}

# l4t_version NV_TEGRA_RELEASE_LINE -> "36.4.3" (from "# R36 (release), REVISION: 4.3, ...")
l4t_version() {
  local major rev
  major=$(printf '%s\n' "$1" | sed -n 's/^# R\([0-9][0-9]*\) .*/\1/p')
  rev=$(printf '%s\n' "$1" | sed -n 's/.*REVISION: *\([0-9][0-9.]*\).*/\1/p')
  [ -n "$major" ] && [ -n "$rev" ] || return 1
  echo "$major.$rev"
}

# jetpack_of L4T_VERSION -> 6 or 7 (the torch-jpN.txt / requirements-jpN.txt to use); fails with a reason
jetpack_of() {
  local major minor
  major=${1%%.*}
  minor=$(echo "$1" | cut -d. -f2)
  if [ "$major" -ge 38 ]; then
    echo 7  # JetPack 7 and later share Ubuntu 24.04, Python 3.12 and CUDA 13
  elif [ "$major" = 36 ] && [ "$minor" -ge 4 ]; then
    echo 6
  elif [ "$major" = 36 ]; then
    echo "L4T R$1 is JetPack 6.0 (CUDA 12.2): no pinned PyTorch for it; upgrade to JetPack 6.1 or later," \
      "or pass --torch-index and --torch-version for a CUDA 12.2 build" >&2
    return 1
  else
    echo "L4T R$1 is not supported (JetPack 6.1+ is L4T R36.4+, JetPack 7 is R38+)" >&2
    return 1
  fi
}

# power_mode_id NAME NVPMODEL_CONF -> the mode's ID; names match whatever the case and space/_/- spelling
power_mode_id() {
  local want
  want=$(echo "$1" | tr '[:lower:] -' '[:upper:]__')
  sed -n 's/^< *POWER_MODEL *ID=\([0-9][0-9]*\) *NAME=\([^ >]*\).*/\1 \2/p' "$2" |
    while read -r id name; do
      if [ "$(echo "$name" | tr '[:lower:] -' '[:upper:]__')" = "$want" ]; then echo "$id"; fi
    done | head -n 1 | grep . || return 1
}

# fastest_mode NVPMODEL_CONF -> MAXN_SUPER where the module has it, else MAXN
fastest_mode() {
  local m
  for m in MAXN_SUPER MAXN; do
    if power_mode_id "$m" "$1" >/dev/null; then echo "$m"; return 0; fi
  done
  return 1
}

# copy_clean_tree SRC DEST: the files git tracks in SRC (as they are in the work tree), or, outside a git
# checkout, SRC without .git, .venv and build leftovers
copy_clean_tree() {
  local git=(git -c "safe.directory=$1" -C "$1")  # root reading a user's checkout
  install -d "$2"
  if "${git[@]}" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    "${git[@]}" ls-files -z | tar -C "$1" --no-recursion --ignore-failed-read --null -cf - -T - | tar -xf - -C "$2"
  else
    tar -C "$1" --exclude=.git --exclude=.venv --exclude='__pycache__' --exclude='*.egg-info' -cf - . |
      tar -xf - -C "$2"
  fi
}

parse_args() {
  MODEL="" PORT=8000 SERVICE=1 JTOP=1 POWER_MODE="" MAXN=0 TORCH_INDEX="" TORCH_VERSION=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --model) need_value "$@"; MODEL="$2"; shift 2 ;;
      --port) need_value "$@"; PORT="$2"; shift 2 ;;
      --power-mode) need_value "$@"; POWER_MODE="$2"; shift 2 ;;
      --maxn) MAXN=1; shift ;;
      --no-service) SERVICE=0; shift ;;
      --no-jtop) JTOP=0; shift ;;
      --torch-index) need_value "$@"; TORCH_INDEX="$2"; shift 2 ;;
      --torch-version) need_value "$@"; TORCH_VERSION="$2"; shift 2 ;;
      -h|--help) usage; exit 0 ;;
      *) bad_usage "unknown option '$1'" ;;
    esac
  done
  case "$PORT" in
    ''|*[!0-9]*) bad_usage "--port must be a number, got '$PORT'" ;;
  esac
  [ "$PORT" -ge 1 ] && [ "$PORT" -le 65535 ] || bad_usage "--port must lie in 1-65535, got $PORT"
  if [ -n "$MODEL" ] && [ ! -f "$MODEL" ]; then bad_usage "--model $MODEL: no such file"; fi
  if [ -n "$MODEL" ] && [ ! -r "$MODEL" ]; then bad_usage "--model $MODEL: not readable"; fi
  if [ -n "$POWER_MODE" ] && [ "$MAXN" = 1 ]; then bad_usage "--power-mode and --maxn exclude each other"; fi
  if { [ -n "$TORCH_INDEX" ] && [ -z "$TORCH_VERSION" ]; } || { [ -z "$TORCH_INDEX" ] && [ -n "$TORCH_VERSION" ]; }; then
    bad_usage "--torch-index and --torch-version go together"
  fi
}

main() {
  parse_args "$@"
  local src
  src="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  [ "$(id -u)" = 0 ] || die "run as root (sudo)"
  [ -f /etc/nv_tegra_release ] || die "this is not a Jetson (no /etc/nv_tegra_release)"

  # ------------------------------------------------------------ which JetPack
  local l4t jp py torch_req
  l4t=$(l4t_version "$(head -n 1 /etc/nv_tegra_release)") || die "cannot read the L4T release from /etc/nv_tegra_release"
  if [ -n "$TORCH_INDEX" ]; then
    jp=$(jetpack_of "$l4t" 2>/dev/null || { [ "${l4t%%.*}" = 36 ] && echo 6; }) || die "L4T R$l4t is not supported"
  else
    jp=$(jetpack_of "$l4t") || die "see above"
  fi
  py=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  local want_py=3.10 cuda=12.6
  if [ "$jp" = 7 ]; then want_py=3.12 cuda=13.0; fi
  [ "$py" = "$want_py" ] || die "JetPack $jp ships Python $want_py, this system's python3 is $py"
  echo "L4T R$l4t: JetPack $jp, Python $py, CUDA $cuda from JetPack"

  # ------------------------------------------------------------ system packages, CUDA toolkit
  apt-get update
  apt-get install -y python3-venv python3-pip python3-dev
  if [ ! -x /usr/local/cuda/bin/nvcc ] || [ ! -d /usr/local/cuda/nvvm ]; then
    # numba-cuda compiles with the toolkit's NVVM and libdevice: JetPack's own, matching its driver
    apt-get install -y "cuda-toolkit-${cuda/./-}" || die "no CUDA toolkit: sudo apt-get install nvidia-jetpack"
  fi
  local have_cuda
  have_cuda=$(/usr/local/cuda/bin/nvcc --version | sed -n 's/.*release \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p')
  [ "$have_cuda" = "$cuda" ] || note "warning: /usr/local/cuda is CUDA $have_cuda, JetPack $jp ships $cuda"
  if [ "$JTOP" = 1 ]; then
    # jetson-stats (jtop) installs system-wide, with its own service
    pip3 install -U jetson-stats || pip3 install -U --break-system-packages jetson-stats || note "jetson-stats not installed"
  fi

  # ------------------------------------------------------------ user, folders
  if ! id "$SERVICE_USER" >/dev/null 2>&1; then
    useradd --system --home-dir "$DATA" --shell /usr/sbin/nologin "$SERVICE_USER"
  fi
  local group
  for group in video render; do  # the GPU device nodes' groups, where the system has them
    if getent group "$group" >/dev/null; then usermod -aG "$group" "$SERVICE_USER"; fi
  done
  install -d -o "$SERVICE_USER" -g "$SERVICE_USER" -m 0750 "$DATA"
  install -d -o root -g "$SERVICE_USER" -m 0750 "$MODELS"

  # ------------------------------------------------------------ source: the tracked files only
  rm -rf "$PREFIX/src.new"
  copy_clean_tree "$src" "$PREFIX/src.new"
  rm -rf "$PREFIX/src" && mv "$PREFIX/src.new" "$PREFIX/src"

  # ------------------------------------------------------------ venv
  # pip's user and system configuration is ignored: an extra index there could put PyPI's torch in.
  export PIP_CONFIG_FILE=/dev/null
  if systemctl is-active --quiet edge-rwkv.service 2>/dev/null; then systemctl stop edge-rwkv.service; fi
  rm -rf "$PREFIX/venv"
  python3 -m venv "$PREFIX/venv"
  local pip="$PREFIX/venv/bin/pip" vpy="$PREFIX/venv/bin/python"
  "$pip" install -U pip wheel
  if [ -n "$TORCH_INDEX" ]; then
    torch_req=$(mktemp)
    printf -- '--index-url %s\ntorch==%s\n' "$TORCH_INDEX" "$TORCH_VERSION" >"$torch_req"
  else
    torch_req="$PREFIX/src/jetson/torch-jp$jp.txt"
  fi
  "$pip" install -r "$torch_req"
  local constraints
  constraints=$(mktemp)
  "$vpy" -c 'import torch; print(f"torch=={torch.__version__}")' >"$constraints"  # nothing may replace it
  "$pip" install -c "$constraints" -r "$PREFIX/src/jetson/requirements-jp$jp.txt"
  "$pip" install -c "$constraints" "$PREFIX/src"  # the daemon is in the base install
  # JetPack's TensorRT Python package (python3-libnvinfer) lives in the system's dist-packages: a .pth makes
  # that folder visible after the venv's own packages (added last, so pip above never saw system packages).
  local trt_dir
  trt_dir=$(dpkg -L python3-libnvinfer 2>/dev/null | sed -n 's|/tensorrt/__init__\.py$||p' | head -n 1)
  if [ -n "$trt_dir" ]; then
    echo "$trt_dir" >"$("$vpy" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/jetpack-tensorrt.pth"
  fi

  # ------------------------------------------------------------ the checks that decide success
  CUDA_HOME=/usr/local/cuda "$vpy" - <<'EOF' || die "PyTorch does not see the GPU: the daemon would not run (see above)"
import sys
import torch

print("torch", torch.__version__, "CUDA", torch.version.cuda, "GPU available:", torch.cuda.is_available())
if not torch.cuda.is_available():
    sys.exit(1)
print("GPU:", torch.cuda.get_device_name(0))
try:
    from edge_rwkv.cuda_kernels import cuda_available
    print("numba-cuda kernels:", cuda_available())
except Exception as e:  # reported, not fatal: the torch path still runs on the GPU
    print("numba-cuda kernels unavailable:", e)
try:
    import tensorrt
    print("TensorRT", tensorrt.__version__, "(JetPack's)")
except ImportError:
    print("TensorRT: not installed (optional; JetPack >= 6.1: sudo apt-get install python3-libnvinfer)")
EOF

  # ------------------------------------------------------------ model: root's, read-only to the daemon
  if [ -n "$MODEL" ]; then
    install -o root -g "$SERVICE_USER" -m 0640 "$MODEL" "$MODELS/model.safetensors.new"
    mv "$MODELS/model.safetensors.new" "$MODELS/model.safetensors"
    "$PREFIX/venv/bin/edge-rwkv" info "$MODELS/model.safetensors" || die "the model does not load"
  fi

  # ------------------------------------------------------------ power mode, by name
  if [ -n "$POWER_MODE" ] || [ "$MAXN" = 1 ]; then
    command -v nvpmodel >/dev/null && [ -f /etc/nvpmodel.conf ] || die "nvpmodel or /etc/nvpmodel.conf missing"
    if [ "$MAXN" = 1 ]; then POWER_MODE=$(fastest_mode /etc/nvpmodel.conf) || die "no MAXN mode in /etc/nvpmodel.conf"; fi
    local id
    id=$(power_mode_id "$POWER_MODE" /etc/nvpmodel.conf) ||
      die "no power mode named '$POWER_MODE'; /etc/nvpmodel.conf has: $(sed -n 's/^< *POWER_MODEL .*NAME=\([^ >]*\).*/\1/p' /etc/nvpmodel.conf | tr '\n' ' ')"
    nvpmodel -m "$id"
    if [ "$MAXN" = 1 ] && command -v jetson_clocks >/dev/null; then jetson_clocks; fi
  fi
  if command -v nvpmodel >/dev/null; then echo "power mode: $(nvpmodel -q 2>/dev/null | head -n 1)"; fi

  # ------------------------------------------------------------ service
  if [ "$SERVICE" = 1 ]; then
    sed "s/--port 8000/--port $PORT/" "$PREFIX/src/jetson/edge-rwkv.service" >/etc/systemd/system/edge-rwkv.service
    systemctl daemon-reload
    systemctl enable edge-rwkv.service
    if [ -f "$MODELS/model.safetensors" ]; then
      systemctl restart edge-rwkv.service
      echo "started: systemctl status edge-rwkv; journalctl -u edge-rwkv -f; http://127.0.0.1:$PORT/"
    else
      echo "installed; put a model at $MODELS/model.safetensors (sudo install -o root -g $SERVICE_USER -m 0640" \
        "MODEL $MODELS/model.safetensors), then: sudo systemctl start edge-rwkv"
    fi
  fi
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
