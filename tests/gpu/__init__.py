"""Checks that need a GPU and a real SGLang, run by hand on a GPU machine from the repository root.

    python -m tests.gpu.acceptance   PASS/FAIL per GPU-only check of the SGLang review (run first)
    python -m tests.gpu.smoke        one GPU, 512 documents end to end: tok/s/GPU, prefix-cache hit rate

tests/test_sglang_backends.py runs the acceptance script against the SGLang double (tests/doubles/sglang)
on CPU, and the smoke run where CUDA and sglang are present.
"""
