"""Helpers of `python -m pipeline merge`: reading the adapter, streaming safetensors, 4-bit round trip, verification.

The stage itself (argument parsing, the order of the steps, the report) is `pipeline/merge.py`.
"""
