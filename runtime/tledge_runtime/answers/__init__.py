"""What an answer means, the same on every backend and in every tool: probabilities (a calibrated softmax),
the decision (the top class, or a binary task's operating point), and what the model does not know.
Export verification, ``tledge evaluate``, the benchmark and every device decide through this one package."""
