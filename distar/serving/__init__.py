"""Serving one-step generators over HTTP: request schemas, PNG encoding, a model service, the FastAPI app.

Plain library code: Ray Serve appears only in services/generator_app.py and `distar serve`.
"""
