"""Translations as data: `locales/<lang>.yaml` (the same keys in each), read by `catalog`."""
