"""Models for the lab: loading a model spec, the tiny random models of each family, chat templates."""
