"""Worker processes: each serves its listeners with trio until told to drain."""
