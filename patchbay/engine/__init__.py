"""The engine: from an accepted event to delivered requests (pipeline, delivery policy, workers, hub)."""
