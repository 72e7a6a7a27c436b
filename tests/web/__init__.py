"""Browser tests of the chat page."""
