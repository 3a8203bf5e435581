# What the GPU machine offers thaw (printed at the start of a device run).
nvidia-smi --query-gpu=name,uuid,driver_version,memory.used,memory.total --format=csv,noheader
uname -r; python3 --version; command -v ip nsenter python3
ls /proc/driver/nvidia/gpus/ 2>&1 && cat /proc/driver/nvidia/gpus/*/information 2>&1 | head -12
python3 - <<'PY'
from importlib.metadata import version
from cuda.bindings import driver as d
print("cuda-bindings", version("cuda-bindings"))
a = d.CUcheckpointRestoreArgs()
print("RestoreArgs fields:", [x for x in dir(a) if not x.startswith("_")])
print("GpuPair:", hasattr(d, "CUcheckpointGpuPair"), [x for x in dir(d.CUcheckpointGpuPair()) if not x.startswith("_")] if hasattr(d, "CUcheckpointGpuPair") else "")
print("states:", [s.name for s in d.CUprocessState])
PY
criu check; thaw doctor
