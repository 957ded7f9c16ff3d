"""sweep: map what happens to a transformer language model when its decoder layers are removed."""
__version__ = "0.1.0"
ENGINE_VERSION = "1"
"""Bumped whenever a change alters measured numbers; part of every setup id, so old rows are never mixed in."""
