"""Analyses of trained models (MemDLM exposure bias)."""
