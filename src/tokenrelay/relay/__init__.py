"""Answers that outlive the connection that asked for them."""
