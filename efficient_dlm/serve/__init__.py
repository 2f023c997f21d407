"""Serving: the continuous-batching engine (engine.py, slots.py, step_program.py) and the
OpenAI-compatible HTTP server on top of it (`edlm serve`)."""
