"""The k × init × seed sweep: config, results schema, running the grid, the results store."""
