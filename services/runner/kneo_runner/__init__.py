"""The runner: executes compiled workflows one step per command."""
