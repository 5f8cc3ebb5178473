"""Training data for the heads some methods need (the trainers live with their methods)."""
