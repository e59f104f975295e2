"""Launching: host facts, the launch plan, the pure argv, boot files, the foreground run."""
