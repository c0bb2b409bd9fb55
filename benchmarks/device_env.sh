# Source at the start of a device command (repo root):  . benchmarks/device_env.sh
# Installs the carried wheels (.whl) and lays out the package as it installs (subpackages mapped).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
rm -rf /tmp/pkg && mkdir -p /tmp/pkg && cp -r edge_rwkv /tmp/pkg/
for sub in cuda_kernels quant export; do cp -r "$sub" "/tmp/pkg/edge_rwkv/$sub"; done
export PYTHONPATH=/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1
