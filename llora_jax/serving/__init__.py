"""Serving many adapters on one base: the adapter bank and routed batch prediction."""
