"""fedward client package."""
