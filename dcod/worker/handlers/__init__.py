"""Built-in worker handlers: `handler = "<name>"` in a [[proxy]] table."""
