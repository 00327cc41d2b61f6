"""entcal.decoding."""
