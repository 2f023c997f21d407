"""`edlm aot`: ahead-of-time compilation of the real train step and sampler for a TPU topology (compiler.py),
and its verb (cli_aot.py). A tool at the CLI level: it builds programs from train/ and sample/ over the
low-level mesh and sharding of parallel/, which imports nothing above it.
"""
