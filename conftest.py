"""Suite-wide test setup: offline model hubs, Triton's CPU interpreter, deterministic threads."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Triton kernels are jitted at import; the interpreter flag must be set before cq.kernels imports
# them so that they run on CPU (no GPU on CI).
os.environ.setdefault("TRITON_INTERPRET", "1")
