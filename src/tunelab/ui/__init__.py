"""Studio: the web board (`tunelab ui`) that lists, launches, watches, compares and tries runs."""
