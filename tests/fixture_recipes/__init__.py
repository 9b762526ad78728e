"""Recipes that live outside the package, as a user's would: found by module path."""
