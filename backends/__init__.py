"""Backends: engines that turn token ids into token ids."""
