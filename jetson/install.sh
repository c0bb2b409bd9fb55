#!/usr/bin/env bash
# Install edge-rwkv on a Jetson as a systemd service.
#
#   sudo jetson/install.sh --model /path/to/model.safetensors [--port 8000] [--no-service] [--no-jtop]
#                          [--torch-index URL] [--maxn]
#
# JetPack 6 (L4T R36, Ubuntu 22.04, Python 3.10, CUDA 12.x) and JetPack 7 (L4T R38, Ubuntu 24.04,
# Python 3.12, CUDA 13). CUDA comes from JetPack (never from pip); PyTorch comes from a wheel built
# for the Jetson (see jetson/README.md); the Numba-CUDA kernels come from numba-cuda.
set -euo pipefail

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX=/opt/edge-rwkv
DATA=/var/lib/edge-rwkv
MODEL=""
PORT=8000
SERVICE=1
JTOP=1
MAXN=0
TORCH_INDEX=""

while [ $# -gt 0 ]; do
  case "$1" in
    --model) MODEL="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --no-service) SERVICE=0; shift ;;
    --no-jtop) JTOP=0; shift ;;
    --maxn) MAXN=1; shift ;;
    --torch-index) TORCH_INDEX="$2"; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

die() { echo "install.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (sudo)"
[ -f /etc/nv_tegra_release ] || die "this is not a Jetson (no /etc/nv_tegra_release)"

# ---------------------------------------------------------------- which JetPack
L4T=$(sed -n 's/^# R\([0-9]*\) .*/\1/p' /etc/nv_tegra_release)
PY=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
case "$L4T" in
  36) JP=6; CU=12; [ -n "$TORCH_INDEX" ] || TORCH_INDEX="https://pypi.jetson-ai-lab.io/jp6/cu126" ;;
  38) JP=7; CU=13; [ -n "$TORCH_INDEX" ] || TORCH_INDEX="https://download.pytorch.org/whl/cu130" ;;
  *) die "L4T R$L4T is not supported (JetPack 6 = R36, JetPack 7 = R38)" ;;
esac
echo "JetPack $JP (L4T R$L4T), Python $PY, CUDA $CU.x from JetPack; torch from $TORCH_INDEX"
command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ] || \
  echo "note: CUDA toolkit not found under /usr/local/cuda; install it with: sudo apt-get install -y nvidia-jetpack" >&2

# ---------------------------------------------------------------- system packages
apt-get update
apt-get install -y python3-venv python3-pip python3-dev
if [ "$JTOP" = 1 ]; then
  # jetson-stats (jtop) installs system-wide, with its own service
  pip3 install -U jetson-stats || pip3 install -U --break-system-packages jetson-stats || \
    echo "note: jetson-stats not installed" >&2
fi

# ---------------------------------------------------------------- user, folders, venv
id edge-rwkv >/dev/null 2>&1 || useradd --system --home-dir "$DATA" --shell /usr/sbin/nologin --groups video,render edge-rwkv \
  || useradd --system --home-dir "$DATA" --shell /usr/sbin/nologin --groups video edge-rwkv
install -d -o edge-rwkv -g edge-rwkv -m 0750 "$DATA" "$DATA/models"
install -d "$PREFIX"
rm -rf "$PREFIX/src" && cp -r "$SRC" "$PREFIX/src"
python3 -m venv "$PREFIX/venv"
PIP="$PREFIX/venv/bin/pip"
"$PIP" install -U pip wheel
# numpy < 2.5: numba-cuda 0.30 fails to import with numpy 2.5
"$PIP" install "numpy>=1.24,<2.5"
"$PIP" install --index-url "$TORCH_INDEX" --extra-index-url https://pypi.org/simple torch
"$PIP" install "numba>=0.60" "numba-cuda[cu$CU]>=0.20"
"$PIP" install "$PREFIX/src"  # the daemon is in the base install
"$PREFIX/venv/bin/python" - <<'EOF'
import torch
print("torch", torch.__version__, "CUDA available:", torch.cuda.is_available())
try:
    from edge_rwkv.cuda_kernels import cuda_available
    print("numba-cuda kernels:", cuda_available())
except Exception as e:  # reported, not fatal: the torch reference still runs
    print("numba-cuda kernels unavailable:", e)
EOF

# ---------------------------------------------------------------- model
if [ -n "$MODEL" ]; then
  install -o edge-rwkv -g edge-rwkv -m 0640 "$MODEL" "$DATA/models/model.safetensors"
  "$PREFIX/venv/bin/edge-rwkv" info "$DATA/models/model.safetensors" || die "the model does not load"
fi

# ---------------------------------------------------------------- power mode
if command -v nvpmodel >/dev/null; then
  echo "power mode: $(nvpmodel -q 2>/dev/null | head -1)"
  if [ "$MAXN" = 1 ]; then
    nvpmodel -m 0 && command -v jetson_clocks >/dev/null && jetson_clocks || true
    echo "power mode now: $(nvpmodel -q 2>/dev/null | head -1)"
  fi
fi

# ---------------------------------------------------------------- service
if [ "$SERVICE" = 1 ]; then
  sed "s/--port 8000/--port $PORT/" "$SRC/jetson/edge-rwkv.service" > /etc/systemd/system/edge-rwkv.service
  systemctl daemon-reload
  systemctl enable edge-rwkv.service
  if [ -f "$DATA/models/model.safetensors" ]; then
    systemctl restart edge-rwkv.service
    echo "started: systemctl status edge-rwkv; journalctl -u edge-rwkv -f; http://127.0.0.1:$PORT/"
  else
    echo "installed; copy a model to $DATA/models/model.safetensors, then: sudo systemctl start edge-rwkv"
  fi
fi
