"""Forward processes and losses of every family, as pure functions."""
