"""The commands that work on a trained model: ``eval``, ``chat``, ``generate``, ``report``."""
