"""The PyTorch modeling code copied into every dLM export (loaded by transformers with trust_remote_code).

Nothing here is imported by efficient_dlm itself; the files depend on torch and transformers only,
so an export directory works without efficient_dlm installed.
"""
