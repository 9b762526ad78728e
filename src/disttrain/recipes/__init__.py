"""Built-in recipes: each a package whose `__init__` holds its keys (torch-free) and `build`.

`recipe=<name>` finds them by name; nothing lists them. Copy one to start your own (README).
"""
