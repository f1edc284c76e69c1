"""Tables, figures and REPORT.md drawn from a results store (imports nothing above it)."""
