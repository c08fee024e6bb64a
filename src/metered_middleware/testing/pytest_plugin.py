"""pytest plugin: fixtures for the local Stripe emulator (registered through the pytest11 entry point)."""
