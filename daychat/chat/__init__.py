"""Chat: the conversation format (format.py), the KV-cache engine with the calculator tool, the chat CLI."""
