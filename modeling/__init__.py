"""Networks and maths of faceforge: the two generators, objectives, samplers, EMA, codecs, text encoders.

This package never imports Ray or MLflow, so it runs and benchmarks anywhere torch runs.
"""
