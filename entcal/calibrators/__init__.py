"""entcal.calibrators."""
