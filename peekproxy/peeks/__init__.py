"""Peeking: remote MSC2444 peeks and the device peeks (MSC2753) built on them."""
