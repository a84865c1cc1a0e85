"""The detection study: does the entropy detector separate adversarial from clean inputs on our model?

Run with ``python -m benchmarks.detection_study`` (``--smoke`` for a seconds-long
run of the same code). See ``README.md`` here for the protocol and the results.
"""
