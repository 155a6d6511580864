"""The testbed: a small federation server that tests use as an MSC2444 peek target."""
