"""Checkpoint conversion: streaming safetensors reading, declarative key tables, atomic orbax writes.

The core (this package minus `cli.py`) works on abstract targets and imports nothing from jaxvid.
"""
