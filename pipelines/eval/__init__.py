"""Evaluation: the synthetic yardstick (a parser faceforge trains, attributes read from pixels) and its job."""
