"""What every floor stands on: files written atomically, child processes, free ports and waits,
argument types, the configuration composed from conf/ and checked by its schema, and the source
files a module runs.

May import: nothing of cnnpipe above it.
"""
