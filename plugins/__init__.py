"""Built-in plugins: they use the same hooks a third-party package would."""
