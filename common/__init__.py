"""fedward common package."""
