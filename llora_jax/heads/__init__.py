"""Readouts that turn a frozen backbone into a task model (frozen heads, label words)."""
