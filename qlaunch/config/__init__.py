"""Configuration: the settings table, profiles, boards."""
