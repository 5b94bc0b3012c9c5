"""Training jobs of the shipped models (``gaq train-default``, ``gaq train-testbed``): they train a
``gaq.toy`` model and score it with ``gaq.eval``'s metrics, so they sit above evaluation."""
