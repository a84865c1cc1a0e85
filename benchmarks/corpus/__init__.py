"""The real-photo corpus builder (``python -m benchmarks.corpus build``).

Extracts photographs that Debian packages install (GCompris, Tux Paint stamps,
desktop wallpapers, Scratch backdrops), turns them into 224x224 inputs labelled
by the bundled model, split by source into dev/test. Modules: ``rcc`` (Qt
resource bundle reader), ``sources`` (what is a photo, where they are),
``build`` (the pipeline), ``__main__`` (command line). The loader for the
result lives in :mod:`detector.corpus` so the detector side never imports the
builder.
"""
