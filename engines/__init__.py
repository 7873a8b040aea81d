"""Built artifacts; ships the small default model (engines/default)."""
