"""Pure functions from typed objects to decisions and configs: no kernel, no files, no network."""
