"""Thin argument parsing for the console scripts; no logic lives here."""
