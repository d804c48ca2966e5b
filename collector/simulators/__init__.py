"""Stand-ins for the outside APIs, so the stack runs end to end with no account anywhere."""
