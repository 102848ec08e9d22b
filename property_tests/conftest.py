"""Property tests: hypothesis profiles are registered in the root conftest.py."""
