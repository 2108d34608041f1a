"""Standard-library helpers every edgefleet side uses: crash-safe file writes and the
reconnect backoff. Imports nothing of edgefleet; everything else may import it."""
