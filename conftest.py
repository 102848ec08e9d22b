"""Suite-wide test setup: offline model hubs, Triton's CPU interpreter, deterministic threads."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Triton kernels are jitted at import; the interpreter flag must be set before cq.kernels imports
# them so that they run on CPU (no GPU on CI).
os.environ.setdefault("TRITON_INTERPRET", "1")
# OpenMP threads spin-wait between ops by default; on a 2-core machine shared by two pytest workers
# that makes small-op tests 20-30x slower (measured 172 s -> 5 s for the rotation tests).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:  # profiles live here (not in property_tests/) so that --hypothesis-profile works at configure time
    from hypothesis import HealthCheck, settings

    settings.register_profile("dev", max_examples=20, deadline=None)
    settings.register_profile("ci", max_examples=50, deadline=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("nightly", max_examples=1000, deadline=None, print_blob=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
except ImportError:  # pragma: no cover
    pass

# conftest files hold no doctests; collecting them as doctest modules would import each one a
# second time under the same top-level name ("import file mismatch").
collect_ignore_glob = ["*/conftest.py"]
