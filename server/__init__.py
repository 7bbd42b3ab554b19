"""fedward server package."""
