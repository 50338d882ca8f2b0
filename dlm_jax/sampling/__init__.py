"""Reverse processes (samplers) of every family, each a jitted lax.scan / lax.while_loop."""
