"""Shared pieces of the ops room: backend dispatch and Triton helpers."""
