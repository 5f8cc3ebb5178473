"""Adapters that put ``mmeff.wrap`` inside other evaluation harnesses (imported only when those are installed)."""
