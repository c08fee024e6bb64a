"""Testing helpers: the local Stripe emulator and pytest fixtures."""
