"""Leaf utilities any room may import: environment switches, comparison helpers, progress bars."""
