"""Patchbay: a self-hosted integration hub — systems, flows, steps, a durable store and runs you can see."""
