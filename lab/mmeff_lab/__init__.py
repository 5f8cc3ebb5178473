"""The mmeff lab: evaluation (POPE, CHAIR, MME, speed), the reference models and synthetic benchmarks, training
and tuning data, the tiny-model factory and the ``mmeff`` command line. It uses the library (``mmeff``); the
library never imports it."""
