from .reasoner import Generation, Reasoner  # noqa: F401
