"""The project's own tests use the fixtures it offers its users (aiohotload.testing)."""

pytest_plugins = ["aiohotload.testing.pytest_plugin"]
