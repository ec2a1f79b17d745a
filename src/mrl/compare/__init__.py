"""Compare the jobs of a sweep: methods x sizes tables, the paper-style figure, and claim checks."""
