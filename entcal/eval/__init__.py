"""entcal.eval."""
