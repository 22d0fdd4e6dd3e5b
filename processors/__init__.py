"""mmattn.processors: attention processors, one module per method family."""
